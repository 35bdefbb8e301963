"""Structured output: a constraint on the answer (a JSON schema, a choice among strings, a regular expression),
turned into a token mask by a maintained grammar engine, llguidance (MIT; why this one: docs/structured-output.md),
and applied inside the one decoding step every backend shares (`gmaivl_rt.model.sampling.decode_step`).

    constraint = constraint_from_options(json_schema=schema)        # checked: InputError naming the problem
    compiled = ConstraintCompiler(tokenizer, vocab_size, stop_ids).compile(constraint)   # cached by its hash
    matcher = compiled.matcher()                                     # one per answer
    allowed = allowed_tokens([matcher])                              # (1, V) bool, the tokens that may come next
    matcher.advance(token)

`constraint_from_options` checks what can be checked without a tokenizer (types, empty choices, sizes, the schema
against JSON Schema's meta-schema); `ConstraintCompiler.compile` compiles it for one tokenizer and refuses what the
engine cannot do (unsupported keywords are refused, not ignored) and a constraint no text satisfies: all before
any decoding. Limits (`MAX_SCHEMA_CHARS` etc.) are documented in docs/structured-output.md."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.limits import short_repr, type_name

CONSTRAINT_OPTIONS = ("json_schema", "choice", "regex")
MAX_SCHEMA_CHARS = 65_536     # a JSON schema, as compact JSON text
MAX_CHOICES = 256             # strings in a choice list
MAX_CHOICE_CHARS = 1_024      # characters of one choice
MAX_REGEX_CHARS = 4_096       # characters of a regular expression
COMPILED_CACHE_SIZE = 256     # compiled constraints kept per tokenizer (least recently used dropped)
# JSON is generated compactly (no free whitespace between tokens): a small model sampling at temperature 1 would
# otherwise spend its budget on spaces and newlines. The schema's own "x-guidance" options override it.
JSON_DEFAULTS = {"whitespace_flexible": False}


@dataclass(frozen=True)
class Constraint:
    """What an answer must be. kind: "json_schema" | "choice" | "regex"; spec: the schema or the choice list as
    compact JSON text, or the regex. Equal constraints have equal `key` (their SHA-256)."""
    kind: str
    spec: str

    @property
    def key(self) -> str:
        return hashlib.sha256(f"{self.kind}\0{self.spec}".encode()).hexdigest()

    def grammar(self) -> str:
        """The llguidance grammar (its JSON text) for this constraint."""
        import llguidance

        if self.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(self.spec, defaults=JSON_DEFAULTS)
        if self.kind == "choice":  # a Lark rule of string literals (JSON string escapes are Lark's too)
            return llguidance.LLMatcher.grammar_from_lark(
                "start: " + " | ".join(json.dumps(c) for c in json.loads(self.spec)))
        return llguidance.LLMatcher.grammar_from_regex(self.spec)


def _check_schema(schema) -> str:
    if isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise InputError(f"json_schema is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(schema, dict):
        raise InputError(f"json_schema must be a JSON object (a dict), got {type_name(schema)}")
    try:
        text = json.dumps(schema, separators=(",", ":"), allow_nan=False)  # key order kept: it orders the answer
    except (TypeError, ValueError) as e:
        raise InputError(f"json_schema cannot be written as JSON ({str(e)[:80]})") from None
    if len(text) > MAX_SCHEMA_CHARS:
        raise LimitError(f"json_schema is {len(text)} characters as compact JSON; the limit is {MAX_SCHEMA_CHARS}")
    try:
        import jsonschema
    except ImportError:
        jsonschema = None
    if jsonschema is not None:  # the meta-schema check names the keyword at fault ("type": "strin", ...)
        validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
        error = jsonschema.exceptions.best_match(validator(validator.META_SCHEMA).iter_errors(schema))
        if error is not None:
            where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
            raise InputError(f"json_schema is not a valid JSON Schema at {short_repr(where, 60)}: "
                             f"{short_repr(error.message, 120)}")
    return text


def _check_choice(choice) -> str:
    if not isinstance(choice, (list, tuple)):
        raise InputError(f"choice must be a list of strings, got {type_name(choice)}")
    if not choice:
        raise InputError("choice is empty: give at least one string")
    if len(choice) > MAX_CHOICES:
        raise LimitError(f"choice has {len(choice)} strings; the limit is {MAX_CHOICES}")
    for i, c in enumerate(choice):
        if not isinstance(c, str) or not c:
            raise InputError(f"choice[{i}] must be a non-empty string, got {type_name(c)} {short_repr(c)}")
        if len(c) > MAX_CHOICE_CHARS:
            raise LimitError(f"choice[{i}] has {len(c)} characters; the limit is {MAX_CHOICE_CHARS}")
    return json.dumps(list(choice), separators=(",", ":"))


def _check_regex(regex) -> str:
    if not isinstance(regex, str) or not regex:
        raise InputError(f"regex must be a non-empty string, got {type_name(regex)} {short_repr(regex)}")
    if len(regex) > MAX_REGEX_CHARS:
        raise LimitError(f"regex has {len(regex)} characters; the limit is {MAX_REGEX_CHARS}")
    return regex


def constraint_from_options(json_schema=None, choice=None, regex=None, constraint=None):
    """The one constraint of a request from the options `json_schema` (a dict or its JSON text), `choice` (a list
    of non-empty strings) and `regex` (a str; the whole answer must match it), at most one of them; or `constraint`
    already made (a Constraint or a CompiledConstraint, returned as it is). None when none is given. InputError /
    LimitError naming the option and the problem."""
    given = [name for name, value in (("json_schema", json_schema), ("choice", choice), ("regex", regex))
             if value is not None]
    if constraint is not None:
        if given:
            raise InputError(f"give constraint or {given[0]}, not both")
        if not isinstance(constraint, (Constraint, CompiledConstraint)):
            raise InputError(f"constraint must be a Constraint, got {type_name(constraint)}")
        return constraint
    if len(given) > 1:
        raise InputError(f"give one of json_schema, choice and regex, not {' and '.join(given)}")
    if not given:
        return None
    if json_schema is not None:
        return Constraint("json_schema", _check_schema(json_schema))
    if choice is not None:
        return Constraint("choice", _check_choice(choice))
    return Constraint("regex", _check_regex(regex))


class CompiledConstraint:
    """A constraint compiled for one tokenizer: `matcher()` makes the per-answer state. compile_s: the seconds its
    compilation took (the cache hands out this same object, so a cached one costs nothing more)."""

    def __init__(self, constraint: Constraint, grammar: str, compiler: "ConstraintCompiler", compile_s: float):
        self.constraint, self.grammar, self.compiler, self.compile_s = constraint, grammar, compiler, compile_s

    @property
    def kind(self) -> str:
        return self.constraint.kind

    def matcher(self) -> "ConstraintMatcher":
        import llguidance

        return ConstraintMatcher(llguidance.LLMatcher(self.compiler.ll_tokenizer, self.grammar, log_level=0),
                                 self.compiler.vocab_size)


class ConstraintMatcher:
    """Where one answer stands in its constraint. `advance(token)` after each generated token; `complete`: the
    answer so far satisfies the constraint (it may end here); `failed`: no continuation can satisfy it."""

    def __init__(self, matcher, vocab_size: int):
        self._matcher, self.vocab_size = matcher, vocab_size

    def advance(self, token: int) -> None:
        self._matcher.consume_token(int(token))

    @property
    def complete(self) -> bool:
        return not self._matcher.is_error() and self._matcher.is_accepting()

    @property
    def failed(self) -> bool:
        return self._matcher.is_error()


_SHIFTS = torch.arange(32, dtype=torch.int32)
_executor = None
_executor_lock = threading.Lock()


def _ll_executor():
    """llguidance's thread pool that computes several masks at once (outside the GIL)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            import llguidance

            _executor = llguidance.LLExecutor()
        return _executor


def allowed_tokens(matchers: list) -> torch.Tensor:
    """matchers: N ConstraintMatcher (same vocabulary size V) -> (N, V) bool on the CPU: the tokens each answer may
    take next (the stop tokens where it may end). A failed matcher allows nothing (the step then ends that answer
    with an error). All masks are computed in one call, in parallel."""
    import llguidance.torch as llt

    vocab_size = matchers[0].vocab_size
    bitmask = llt.allocate_token_bitmask(len(matchers), vocab_size)
    if len(matchers) == 1:
        llt.fill_next_token_bitmask(matchers[0]._matcher, bitmask, 0)
    else:
        llt.fill_next_token_bitmask_par(_ll_executor(), [(m._matcher, i) for i, m in enumerate(matchers)], bitmask)
    allowed = ((bitmask[:, :, None] >> _SHIFTS) & 1).bool().reshape(len(matchers), -1)[:, :vocab_size]
    for i, m in enumerate(matchers):
        if m.failed:
            allowed[i] = False
    return allowed


class ConstraintCompiler:
    """Compiles constraints for one tokenizer. tokenizer: a transformers fast tokenizer; vocab_size: the model's
    logits width (>= the tokenizer's length); stop_ids: the token ids that end an answer (allowed where the
    constraint is satisfied). Compiled constraints are cached by the constraint's hash (thread-safe)."""

    def __init__(self, tokenizer, vocab_size: int, stop_ids: list[int]):
        from gmaivl_rt.extras import require

        require("llguidance", extra="structured")
        import llguidance
        import llguidance.hf

        self.vocab_size = int(vocab_size)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                         eos_token=[int(i) for i in stop_ids])
        self._llguidance = llguidance
        self._cache: OrderedDict[str, CompiledConstraint] = OrderedDict()
        self._lock = threading.Lock()

    def compile(self, constraint) -> CompiledConstraint:
        """A Constraint (or a CompiledConstraint of this compiler, returned as it is) -> CompiledConstraint.
        InputError before any decoding for what the engine cannot compile (naming the problem) and for a
        constraint no answer can satisfy (a regex that matches nothing)."""
        if isinstance(constraint, CompiledConstraint):
            if constraint.compiler is self:
                return constraint
            constraint = constraint.constraint
        with self._lock:
            hit = self._cache.get(constraint.key)
            if hit is not None:
                self._cache.move_to_end(constraint.key)
                return hit
        start = time.perf_counter()
        name = constraint.kind
        try:
            grammar = constraint.grammar()
        except (ValueError, TypeError) as e:
            raise InputError(f"{name} cannot be compiled: {_engine_message(e)}") from None
        is_error, messages = self._llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise InputError(f"{name} cannot be compiled: {_engine_message(messages[0] if messages else '')}")
        compiled = CompiledConstraint(constraint, grammar, self, 0.0)
        first = compiled.matcher()
        if first.failed or not bool(allowed_tokens([first]).any()):
            raise InputError(f"{name} allows no answer: no text satisfies it")
        compiled.compile_s = time.perf_counter() - start
        with self._lock:
            self._cache[constraint.key] = compiled
            while len(self._cache) > COMPILED_CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled


def _engine_message(error) -> str:
    """The grammar engine's complaint, on one line and short (it names the keyword or the regex error)."""
    text = re.sub(r"^at \d+\(\d+\): ", "", " ".join(str(error).split()))
    for marker in (" 1 | ", " at 1(", "<state>"):
        text = text.split(marker)[0]
    return text[:200] or "the grammar engine refused it"

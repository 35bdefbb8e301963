"""Structured output in the shared decoding step, against independent references: the constraint's token mask
against a brute-force reading of the tokenizer's own decoding (which tokens keep the text a prefix of an allowed
answer), the whole step against transformers' logits processors with `PrefixConstrainedLogitsProcessor` fed that
brute-force rule, logprobs against `torch.log_softmax` of transformers' processed scores, and answers against
`jsonschema` (the schema's own validator, not the grammar engine)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("llguidance", reason="structured output needs the grammar engine: pip install 'gmaivl-rt[structured]'")
jsonschema = pytest.importorskip("jsonschema")

from transformers import (  # noqa: E402
    LogitsProcessorList,
    PrefixConstrainedLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gmaivl_rt.errors import InputError, LimitError  # noqa: E402
from gmaivl_rt.model.constraint import (MAX_SCHEMA_CHARS, ConstraintCompiler, allowed_tokens,  # noqa: E402
                                        constraint_from_options)
from gmaivl_rt.model.sampling import SamplingParams, StopRule, decode_step  # noqa: E402

FINDINGS = json.loads((Path(__file__).parents[2] / "examples" / "findings.schema.json").read_text())
TEXTS = ["The image is an axial CT slice of the chest.", "Answer: A", "Answer: B", "coronal sagittal axial",
         "yes no", "{\"modality\": \"CT\", \"plane\": \"axial\"} 12 mm left right"] * 20
CHOICES = ["axial", "coronal", "sagittal", "axial oblique"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from gmaivl_rt.runtime.tokenizer import chat_stop_ids
    from gmaivl_rt.train.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(TEXTS, tmp_path_factory.mktemp("tok"), vocab_size=320, min_frequency=1)
    tok.stop_ids = chat_stop_ids(tok)
    return tok


@pytest.fixture(scope="module")
def compiler(tokenizer):
    # the model's logits are wider than the tokenizer (padded vocabularies are common): 8 ids no text maps to
    return ConstraintCompiler(tokenizer, len(tokenizer) + 8, tokenizer.stop_ids)


def _prefix_rule(tokenizer, choices):
    """The brute-force reference: token t may follow `text` when text + t's decoded text is still a prefix of a
    choice; a stop token when text already is a choice. Returns allowed(text) -> set of ids."""
    specials = set(tokenizer.all_special_ids)
    pieces = {i: tokenizer.decode([i]) for i in range(len(tokenizer)) if i not in specials}

    def allowed(text: str) -> set:
        out = {i for i, piece in pieces.items() if piece and any(c.startswith(text + piece) for c in choices)}
        return out | (set(tokenizer.stop_ids) if text in choices else set())

    return allowed


def test_choice_mask_follows_the_brute_force_rule_at_every_step(tokenizer, compiler):
    """At every step of several walks through the choices, every token the engine's mask allows is one the
    brute-force rule allows (stop tokens only once a whole choice is written; ids past the tokenizer never), and
    where the text is not yet decided (the start) it allows all of them. (Where the rest of the text is forced,
    llguidance allows only the tokens of its canonical tokenization, a subset, by design.) Mutants: the bitmask
    unpacked with the wrong bit order (`>> (31 - shifts)`); the stop ids not passed to the grammar engine
    (eos_token=[]); the mask cut one token short (`[:, :vocab_size - 1]`)."""
    compiled = compiler.compile(constraint_from_options(choice=CHOICES))
    rule = _prefix_rule(tokenizer, CHOICES)
    g = torch.Generator().manual_seed(0)
    for walk in range(6):
        matcher, text = compiled.matcher(), ""
        for _ in range(20):
            mask = allowed_tokens([matcher])[0]
            assert mask.shape == (len(tokenizer) + 8,)
            got, want = set(mask.nonzero()[:, 0].tolist()), rule(text)
            assert got and got <= want, (walk, text)
            if text == "" or (text in CHOICES and not any(c.startswith(text) and c != text for c in CHOICES)):
                assert got == want, (walk, text)
            options = mask.nonzero()[:, 0]
            token = int(options[torch.randint(len(options), (1,), generator=g)])
            matcher.advance(token)
            if token in tokenizer.stop_ids:
                assert text in CHOICES and matcher.complete
                break
            text += tokenizer.decode([token])
        else:
            pytest.fail("a walk through a choice list did not end")


def _reference_step(logits, history, params, allowed_fn):
    """transformers' processors in their order, the constraint as PrefixConstrainedLogitsProcessor."""
    processors = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
                                      PrefixConstrainedLogitsProcessor(allowed_fn, num_beams=1)])
    if params.do_sample:
        processors += [TemperatureLogitsWarper(params.temperature), TopKLogitsWarper(params.top_k),
                       TopPLogitsWarper(params.top_p)]
    return processors(history, logits.clone())


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampled"])
def test_constrained_step_and_logprobs_match_transformers(tokenizer, compiler, do_sample):
    """Eight rows decode under the choice constraint through `decode_step` (each with its own matcher, batched
    masks) and, independently, through transformers' processors with PrefixConstrainedLogitsProcessor fed the
    brute-force rule: the same token each step (sampling: the same seeded draw from the reference softmax), and
    the logprobs (chosen and top 5) equal `log_softmax` of the reference scores: after the mask, i.e. what was
    sampled from. Mutants seen failing: logprobs from the raw logits (`step_logits.float().log_softmax`); rows
    given each other's mask (`allowed.flip(0)`)."""
    V = len(tokenizer) + 8
    rule = _prefix_rule(tokenizer, CHOICES)
    params = SamplingParams(do_sample=do_sample, temperature=0.7, top_k=40, top_p=0.95, repetition_penalty=1.3)
    stop = StopRule(list(tokenizer.stop_ids), tokenizer.pad_token_id or 0)
    compiled = compiler.compile(constraint_from_options(choice=CHOICES))
    rows = 8
    matchers = [compiled.matcher() for _ in range(rows)]
    texts = [""] * rows
    g = torch.Generator().manual_seed(1)
    history = torch.randint(3, len(tokenizer), (rows, 5), generator=g)
    finished = torch.zeros(rows, dtype=torch.bool)
    ours, ref = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    for _ in range(12):
        logits = 4 * torch.randn(rows, V, generator=g)
        allowed = allowed_tokens(matchers)
        step = decode_step(logits, history, finished, params, stop, ours, allowed=allowed, top_logprobs=5)

        def allowed_fn(batch_id, _ids):  # what the rule allows of the engine's choice (see the test above)
            return sorted(rule(texts[batch_id]) & set(allowed[batch_id].nonzero()[:, 0].tolist()))

        want_scores = _reference_step(logits, history, params, allowed_fn)
        want_logprobs = torch.log_softmax(want_scores, -1)
        if do_sample:
            want = torch.multinomial(want_scores.softmax(-1), 1, generator=ref)[:, 0]
        else:
            want = want_scores.argmax(-1)
        for r in range(rows):
            if finished[r]:
                continue
            assert int(step.next_tokens[r]) == int(want[r])
            assert float(step.logprobs.chosen[r]) == pytest.approx(float(want_logprobs[r, want[r]]), abs=1e-4)
            top = torch.topk(want_logprobs[r], 5)
            finite = top.values > -float("inf")
            assert step.logprobs.top_ids[r][finite].tolist() == top.indices[finite].tolist()
            torch.testing.assert_close(step.logprobs.top[r][finite], top.values[finite], atol=1e-4, rtol=0)
            token = int(step.next_tokens[r])
            matchers[r].advance(token)
            if token not in tokenizer.stop_ids:
                texts[r] += tokenizer.decode([token])
        history, finished = step.sequences, step.finished
        if bool(finished.all()):
            break
    assert bool(finished.all()) and all(t in CHOICES for t in texts)


def test_a_row_with_every_token_banned_never_raises_and_ends_alone():
    """Sampling a row whose every score is -inf used to raise (softmax NaN -> multinomial), a 500 over HTTP.
    Unconstrained, it ends with its eos; constrained (a mask that excludes everything), it is `failed`; either
    way the other rows draw exactly what they draw alone. Mutants seen failing: the empty-row guard removed from
    `pick_token` (raises); `failed` set for unconstrained rows too; the empty row's eos replaced by the pad."""
    V = 30
    params = SamplingParams(do_sample=True, temperature=0.9, top_k=5, top_p=0.9, min_p=0.05)
    stop = StopRule([7], 0)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(2))
    logits[1] = -float("inf")
    history = torch.zeros(3, 2, dtype=torch.long)
    finished = torch.zeros(3, dtype=torch.bool)
    step = decode_step(logits, history, finished, params, stop, torch.Generator().manual_seed(4))
    assert step.next_tokens[1] == 7 and bool(step.finished[1]) and not bool(step.failed.any())
    alone = decode_step(logits[[0]], history[[0]], finished[[0]], params, stop, torch.Generator().manual_seed(4))
    assert int(alone.next_tokens[0]) == int(step.next_tokens[0])

    allowed = torch.ones(3, V, dtype=torch.bool)
    allowed[2] = False
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3))
    step = decode_step(logits, history, finished, params, stop, torch.Generator().manual_seed(4), allowed=allowed,
                       top_logprobs=2)
    assert step.failed.tolist() == [False, False, True] and bool(step.finished[2]) and int(step.next_tokens[2]) == 0
    alone = decode_step(logits[:2], history[:2], finished[:2], params, stop, torch.Generator().manual_seed(4),
                        allowed=allowed[:2])
    assert step.next_tokens[:2].tolist() == alone.next_tokens.tolist()


@pytest.mark.parametrize("options, error, match", [
    ({"choice": []}, InputError, "choice is empty"),
    ({"choice": ["a", ""]}, InputError, r"choice\[1\] must be a non-empty string"),
    ({"choice": "abc"}, InputError, "choice must be a list"),
    ({"json_schema": {"type": "strin"}}, InputError, "not a valid JSON Schema at 'type'"),
    ({"json_schema": "{not json"}, InputError, "json_schema is not valid JSON"),
    ({"json_schema": [1]}, InputError, "must be a JSON object"),
    ({"json_schema": {"type": "string", "enum": ["x" * 100] * (MAX_SCHEMA_CHARS // 100)}}, LimitError,
     f"the limit is {MAX_SCHEMA_CHARS}"),
    ({"regex": ""}, InputError, "regex must be a non-empty string"),
    ({"regex": "a", "choice": ["b"]}, InputError, "not choice and regex"),
], ids=lambda v: str(v)[:30] if isinstance(v, dict) else None)
def test_bad_constraints_are_refused_naming_the_problem(options, error, match):
    """Mutants seen failing: the empty-list check removed; the schema size limit removed."""
    with pytest.raises(error, match=match):
        constraint_from_options(**options)


@pytest.mark.parametrize("options, match", [
    ({"regex": "(ab"}, "regex cannot be compiled: .*unclosed group"),
    ({"regex": r"x[^\s\S]"}, "regex allows no answer"),
    ({"json_schema": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}},
     r"cannot be compiled: Unimplemented keys: \[\"uniqueItems\"\]"),
    ({"json_schema": {"not": {"type": "string"}}}, "Unimplemented keys"),
    ({"json_schema": {"type": "integer", "minimum": 5, "maximum": 1}}, "cannot be compiled: .*minimum"),
])
def test_what_the_engine_cannot_compile_is_refused_not_ignored(compiler, options, match):
    """A keyword the grammar engine does not implement is an InputError naming it (jsonschema accepts these
    schemas, so it is the engine that must refuse), a regex that matches nothing is refused before decoding.
    Mutants: `validate_grammar_with_warnings` not consulted (a schema compiled without its uniqueItems); the
    first-mask check removed (the empty regex accepted)."""
    with pytest.raises(InputError, match=match):
        compiler.compile(constraint_from_options(**options))


def test_compiled_constraints_are_cached_by_hash(compiler):
    """The same schema (a new dict) compiles once; a different one is a new entry. Mutant: the cache lookup
    removed (a new object every time)."""
    first = compiler.compile(constraint_from_options(json_schema=dict(FINDINGS)))
    assert compiler.compile(constraint_from_options(json_schema=json.loads(json.dumps(FINDINGS)))) is first
    assert compiler.compile(constraint_from_options(json_schema={"type": "object"})) is not first


def test_findings_schema_is_a_valid_schema_of_the_kind_shown_in_the_issue():
    """The shipped example validates the issue's finding (with its body part) and refuses a wrong one."""
    jsonschema.Draft202012Validator.check_schema(FINDINGS)
    finding = {"modality": "CT", "plane": "axial", "body_part": "chest",
               "lesion": {"present": True, "side": "left", "size_mm": 12}}
    jsonschema.validate(finding, FINDINGS)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**finding, "plane": "diagonal"}, FINDINGS)


def test_generate_tokens_records_each_rows_logprobs_and_constraint_as_alone(tokenizer, compiler):
    """`generate_tokens` over three rows (one constraint per row, one of them free; greedy, logits that depend on
    the row's last token) records in its DecodeTrace the same tokens, logprobs (chosen and top 3) and completeness
    as each row decoded alone. Mutants: `TokenLogprob.from_step` reading row 0's top list for every row; the
    per-row constraint list applied as the first row's to all."""
    from types import SimpleNamespace

    from gmaivl_rt.model.sampling import DecodeTrace, generate_tokens

    V = len(tokenizer) + 8
    weights = torch.randn(V, V, generator=torch.Generator().manual_seed(5))
    config = SimpleNamespace(eos_token_id=list(tokenizer.stop_ids), pad_token_id=0, context_length=64)
    constraints = [compiler.compile(constraint_from_options(choice=CHOICES)), None,
                   compiler.compile(constraint_from_options(regex="[a-z]{2,6}"))]
    prompts = torch.randint(10, len(tokenizer), (3, 4), generator=torch.Generator().manual_seed(6))

    def run(rows):
        state = {"last": prompts[rows, -1]}

        def step(tokens):
            state["last"] = tokens
            return 3 * weights[tokens]

        trace = DecodeTrace()
        out = generate_tokens(lambda: 3 * weights[state["last"]], step, prompts[rows], config, max_new_tokens=10,
                              constraint=[constraints[r] for r in rows], logprobs=True, top_logprobs=3, trace=trace)
        return out, trace

    out, trace = run([0, 1, 2])
    assert trace.complete[0] is True and trace.complete[1] is None and trace.complete[2] is True
    for row in range(3):
        alone, alone_trace = run([row])
        n = alone.shape[1]
        assert out[row, :n].tolist() == alone[0].tolist()
        assert trace.complete[row] == alone_trace.complete[0]
        assert len(trace.logprobs[row]) == len(alone_trace.logprobs[0])
        for a, b in zip(trace.logprobs[row], alone_trace.logprobs[0]):
            assert a.token == b.token and a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]

"""Next-token selection shared by every backend (torch, ONNX Runtime, TensorRT), in transformers' order:
repetition penalty, no-repeat n-gram ban, then temperature, top-k, top-p and min-p when sampling.

Every value `SamplingParams` accepts is numerically safe here: fp32 would round a divisor such as temperature 1e-300
to 0.0 (0/0 = nan, and one nan row used to end every request batched with it), so divisors are kept inside fp32's
normal range and the temperature scales logits already shifted by their maximum. A tiny temperature thus samples
greedily (ties shared), a huge one uniformly: the limits of the distribution it describes."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.limits import DEFAULT_LIMITS, Limits, check_context, check_max_new_tokens, short_repr, type_name
from gmaivl_rt.model.constraint import constraint_from_options


SAMPLING_OPTIONS = ("do_sample", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                    "no_repeat_ngram_size")
# Structured output and logprobs (docs/structured-output.md): json_schema / choice / regex become one `constraint`
# (gmaivl_rt.model.constraint); logprobs (bool) and top_logprobs (int, 0..MAX_TOP_LOGPROBS) as OpenAI names them.
OUTPUT_OPTIONS = ("json_schema", "choice", "regex", "constraint", "logprobs", "top_logprobs")
GENERATION_OPTIONS = ("max_new_tokens", *SAMPLING_OPTIONS, "eos_token_id", "pad_token_id", "generator",
                      *OUTPUT_OPTIONS)
MAX_TOP_LOGPROBS = 20  # OpenAI's ceiling


@dataclass
class SamplingParams:
    """Sampling options, each type- and range-checked here (the one place of these rules): InputError naming the
    option. Ints are ints (bool refused), floats accept ints; do_sample is a bool."""
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise InputError(f"do_sample must be a bool, got {type_name(self.do_sample)}")
        self.do_sample = bool(self.do_sample)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            setattr(self, name, _number(getattr(self, name), name))
        for name in ("top_k", "no_repeat_ngram_size"):
            setattr(self, name, _integer(getattr(self, name), name))
        if self.temperature <= 0:
            raise InputError(f"temperature must be > 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise InputError(f"min_p must be in [0, 1], got {self.min_p}")
        for name in ("top_k", "no_repeat_ngram_size"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be an int >= 0, got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def _number(value, name: str) -> float:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{name} must be a number, got {type_name(value)} {short_repr(value)}")
    if not math.isfinite(float(value)):
        raise InputError(f"{name} must be finite, got {float(value)}")
    return float(value)


def _integer(value, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an int, got {type_name(value)} {short_repr(value)}")
    return int(value)


_FP32 = torch.finfo(torch.float32)


def fp32_divisor(value: float) -> float:
    """`value` (> 0) clamped into fp32's normal range, so a division in fp32 never divides by a rounded 0.0 nor by
    inf. The same number for every ordinary setting: only values beyond fp32's range move."""
    return min(max(float(value), _FP32.tiny), _FP32.max)


def _ragged_ids(rows: list, device) -> torch.Tensor:
    """B id lists of any lengths -> (B, max length) int64, each row padded with its own first id: gathering and
    scattering a score twice at one index writes the same value, so the padding changes nothing."""
    width = max(len(r) for r in rows)
    return torch.tensor([r + r[:1] * (width - len(r)) for r in rows], dtype=torch.int64, device=device)


def apply_repetition_penalty(scores, sequences, penalty):
    """scores: (B, V) fp32; sequences: (B, S) ids seen so far, or a list of B non-empty id lists. CTRL-style penalty, as transformers applies it.
    A seen score that the penalty drives past fp32's range stays at its largest finite value (never inf or nan)."""
    if penalty == 1.0:
        return scores
    if isinstance(sequences, list):
        sequences = _ragged_ids(sequences, scores.device)
    penalty = fp32_divisor(penalty)
    seen = torch.gather(scores, 1, sequences)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty).clamp(max=_FP32.max)
    return scores.scatter(1, sequences, seen)


def ban_repeated_ngrams(scores, sequences, n):
    """Forbid any token that would complete an n-gram already present in its row of `sequences`: (B, S) ids, or
    a list of B id lists of any lengths (the engine's rows)."""
    rows = sequences if isinstance(sequences, list) else sequences.tolist()
    if n <= 0 or max(map(len, rows), default=0) + 1 < n:
        return scores
    scores = scores.clone()
    prefix_len = n - 1
    for row, seq in enumerate(rows):
        if len(seq) < n:  # no n-gram yet in this row
            continue
        prefix = tuple(seq[len(seq) - prefix_len:]) if prefix_len else ()
        banned = {seq[i + prefix_len] for i in range(len(seq) - n + 1) if tuple(seq[i:i + prefix_len]) == prefix}
        if banned:
            scores[row, list(banned)] = -float("inf")
    return scores


def processed_scores(logits, sequences, params: SamplingParams, allowed=None):
    """The scores the next token is chosen from, (B, V) fp32: logits (B, V) after the repetition penalty, the n-gram
    ban (sequences: (B, S) ids so far, or B id lists of any lengths) and the constraint mask `allowed` ((B, V) bool, or None: no constraint), then, when sampling, temperature,
    top-k, top-p and min-p. Greedy picks their argmax, sampling draws from their softmax; their log-softmax is what
    `logprobs` report (vLLM's processed logprobs). Banned tokens are -inf."""
    scores = logits.float()
    scores = apply_repetition_penalty(scores, sequences, params.repetition_penalty)
    scores = ban_repeated_ngrams(scores, sequences, params.no_repeat_ngram_size)
    if allowed is not None:  # the constraint's mask, as a logits processor (before the sampling filters, as vLLM)
        scores = scores.masked_fill(~allowed.to(scores.device), -float("inf"))
    if not params.do_sample:
        return scores
    # Shifted by the row's maximum first, the scaled scores are <= 0 with the best at exactly 0: no inf - inf
    # whatever the temperature (softmax shifts by the maximum anyway).
    # (A row with every token banned keeps its -inf: its maximum is taken as 0, never -inf - -inf.)
    top = scores.max(-1, keepdim=True).values
    scores = (scores - top.masked_fill(top == -float("inf"), 0.0)) / fp32_divisor(params.temperature)
    if params.top_k > 0:
        kth = torch.topk(scores, min(params.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - params.top_p
        drop[:, -1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    if params.min_p > 0:  # keep tokens at least min_p times as likely as the most likely one (always kept)
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < params.min_p * probs.max(-1, keepdim=True).values, -float("inf"))
    return scores


def _no_token_left(scores) -> torch.Tensor:
    """(B,) bool: rows whose every score is -inf (every token banned), NaN rows excluded (a broken forward)."""
    return ~(scores > -float("inf")).any(-1) & ~scores.isnan().any(-1)


def pick_token(scores, params: SamplingParams, generator=None) -> torch.Tensor:
    """scores (B, V) from `processed_scores` -> (B,) int64: argmax (greedy) or a draw from their softmax (generator:
    one torch.Generator or None for the batch, or a list of B, one per row); -1 for a row with no token left (every
    score -inf; the caller decides how it ends). A NaN row raises when sampling; greedy picks its first NaN (argmax)."""
    if not params.do_sample:  # one reduction: the first maximum's index (argmax's), and whether any token is left
        best, tokens = scores.max(-1)  # a NaN row: its first NaN's index, as argmax picks (NaN is not -inf)
        return tokens.masked_fill(best == -float("inf"), -1)
    empty = _no_token_left(scores)
    if bool(empty.any()):  # no softmax of an all -inf row (it is NaN and multinomial raises)
        scores = scores.masked_fill(empty[:, None], 0.0)
    if isinstance(generator, (list, tuple)):  # a generator per row: each row draws from its own stream
        probs = scores.softmax(-1)
        tokens = torch.cat([torch.multinomial(probs[r:r + 1], 1, generator=g)[:, 0] for r, g in enumerate(generator)])
    else:
        tokens = torch.multinomial(scores.softmax(-1), 1, generator=generator)[:, 0]
    return tokens.masked_fill(empty.to(tokens.device), -1)


def select_next_token(logits, sequences, params: SamplingParams, generator=None, allowed=None):
    """logits: (B, V) last-position logits; sequences: (B, S) ids so far (prompt included); allowed: (B, V) bool
    constraint mask or None. Returns (B,) int64 (-1 where no token is left: see `pick_token`)."""
    return pick_token(processed_scores(logits, sequences, params, allowed), params, generator)


def _as_list(ids) -> list[int]:
    if ids is None:
        return []
    return [int(i) for i in ids] if isinstance(ids, (list, tuple)) else [int(ids)]


@dataclass
class StopRule:
    """When a row is done: it produced one of `eos` ids; afterwards it is filled with `pad`."""
    eos: list
    pad: int

    @classmethod
    def from_config(cls, text_config, eos_token_id=None, pad_token_id=None) -> "StopRule":
        """eos_token_id: int or list (default: text_config's); pad_token_id default: the config's pad, else the
        first eos, else 0."""
        eos = _as_list(text_config.eos_token_id if eos_token_id is None else eos_token_id)
        pad = pad_token_id if pad_token_id is not None else (text_config.pad_token_id or (eos or [0])[0])
        return cls(eos, int(pad))


class StepLogprobs(NamedTuple):
    """Log-probabilities of one step, from the log-softmax of `processed_scores` (after the constraint mask):
    chosen (B,) fp32 of the token picked; top_ids (B, k) int64 and top (B, k) fp32, the k most likely (k may be 0;
    -inf entries are banned tokens, to be dropped)."""
    chosen: torch.Tensor
    top_ids: torch.Tensor
    top: torch.Tensor


class DecodeStep(NamedTuple):
    """What `decode_step` returns: next_tokens (B,) int64, sequences (B, S + 1), finished (B,) bool, failed (B,)
    bool (a constrained row with no token left: it ends with an error) and logprobs (StepLogprobs, or None when
    not asked for)."""
    next_tokens: torch.Tensor
    sequences: torch.Tensor
    finished: torch.Tensor
    failed: torch.Tensor
    logprobs: StepLogprobs | None


def decode_step(step_logits, sequences, finished, params: SamplingParams, stop: StopRule, generator=None, *,
                allowed=None, top_logprobs: int | None = None) -> DecodeStep:
    """One token for each row: step_logits (B, V) at the last position; sequences (B, S) int64 ids so far;
    finished (B,) bool; allowed: (B, V) bool constraint mask (None: unconstrained); top_logprobs: None (no
    logprobs) or k >= 0 (the chosen token's logprob and the k most likely). Finished rows get `stop.pad`; a row
    that produced an eos becomes finished. A row with no token left (every token banned) ends: unconstrained, with
    its first eos (the answer cannot go on); constrained, as `failed` (padded), so the caller ends that answer
    alone with an error. The step `generate_tokens` and the engine share."""
    scores = processed_scores(step_logits, sequences, params, allowed)
    next_tokens, done, failed, logprobs = _choose(scores, finished, params, stop, generator, allowed is not None,
                                                  top_logprobs)
    return DecodeStep(next_tokens, torch.cat([sequences, next_tokens[:, None]], dim=1), done, failed, logprobs)


def decode_rows(step_logits, histories: list, params: SamplingParams, stop: StopRule, generators=None, *,
                top_logprobs: int | None = None) -> DecodeStep:
    """`decode_step` for rows that each carry their own history, none finished and none constrained (the serving
    engine's running rows that share `params`, `stop` and `top_logprobs`, in one call): step_logits (B, V);
    histories: B lists of int ids so far (prompt included, any lengths); generators: None, or B generators (or
    None entries) so a seeded row draws from its own stream whatever it is batched with. The same rules as
    `decode_step` (which a row alone would get); returns its DecodeStep with sequences None (the caller keeps the
    histories)."""
    scores = processed_scores(step_logits, histories, params)
    next_tokens, done, failed, logprobs = _choose(scores, None, params, stop, generators, False, top_logprobs)
    return DecodeStep(next_tokens, None, done, failed, logprobs)


def _choose(scores, finished, params: SamplingParams, stop: StopRule, generator, constrained: bool,
            top_logprobs: int | None):
    """The token of each row from its processed scores, and the stopping rule (see `decode_step`): returns
    next_tokens (B,), done (B,), failed (B,) and logprobs (StepLogprobs or None). finished: (B,) bool, or None
    when no row has finished (`decode_rows`: the ops for finished rows skipped, each a few microseconds a step)."""
    next_tokens = pick_token(scores, params, generator)
    if finished is None:
        empty = next_tokens < 0
    else:
        next_tokens = next_tokens.to(finished.device)
        empty = (next_tokens < 0) & ~finished
    failed = empty if constrained else torch.zeros_like(empty)
    end = stop.eos[0] if stop.eos and not constrained else stop.pad
    next_tokens = next_tokens.masked_fill(empty, end)
    if finished is not None:
        next_tokens = next_tokens.masked_fill(finished, stop.pad)
    logprobs = None
    if top_logprobs is not None:
        logsoftmax = scores.log_softmax(-1)
        chosen = logsoftmax.gather(1, next_tokens.clamp(min=0)[:, None].to(logsoftmax.device))[:, 0]
        top, top_ids = torch.topk(logsoftmax, min(int(top_logprobs), logsoftmax.shape[-1]), dim=-1)
        logprobs = StepLogprobs(chosen, top_ids, top)
    done = empty if finished is None else finished | empty
    if stop.eos:
        done = done | torch.isin(next_tokens, torch.tensor(stop.eos, dtype=torch.long, device=next_tokens.device))
    return next_tokens, done, failed, logprobs


@dataclass
class TokenLogprob:
    """One generated token's log-probability and the `top_logprobs` most likely alternatives [(id, logprob)],
    banned tokens left out."""
    token: int
    logprob: float
    top: list = field(default_factory=list)

    @classmethod
    def from_step(cls, logprobs: StepLogprobs, row: int, token: int) -> "TokenLogprob":
        top = [(int(i), float(v)) for i, v in zip(logprobs.top_ids[row].tolist(), logprobs.top[row].tolist())
               if v > -float("inf")]
        return cls(int(token), float(logprobs.chosen[row]), top)


@dataclass
class DecodeTrace:
    """What `generate_tokens` records beside the ids, one entry per row: logprobs (a TokenLogprob per generated
    token, eos included; when logprobs were asked for), failed (the constraint left no token: the row ended there,
    its answer unfinished) and complete (the answer satisfies its constraint; None without one)."""
    logprobs: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    complete: list = field(default_factory=list)


def seeded_generator(seed, device="cpu") -> torch.Generator:
    """The one rule of `seed`: a torch.Generator on `device` (where the logits reach the sampler: the model's
    device on the torch backend, the CPU on graph backends) seeded with it; equal seeds, equal samples.
    seed: an int (bool refused) in torch's range [-2**63, 2**64 - 1], else InputError."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise InputError(f"seed must be an int, got {type_name(seed)}")
    if not -2**63 <= seed < 2**64:
        raise InputError("seed must be an int in [-2**63, 2**64 - 1]")
    return torch.Generator(device=device).manual_seed(seed)


def generate_tokens(prefill, step, input_ids, text_config, *, max_new_tokens: int = 32, do_sample: bool = False,
                    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, repetition_penalty: float = 1.0,
                    no_repeat_ngram_size: int = 0, min_p: float = 0.0, eos_token_id=None, pad_token_id=None,
                    generator: torch.Generator | None = None, constraint=None, logprobs: bool = False,
                    top_logprobs: int = 0, trace: DecodeTrace | None = None) -> torch.Tensor:
    """The decoding loop every backend shares, with transformers' stopping rule.

    prefill() -> (B, V) logits at each prompt's last token; step(next_tokens (B,) int64) -> (B, V) logits after
    feeding them. input_ids: (B, S) prompts. eos_token_id, pad_token_id: see `StopRule.from_config`.
    constraint: a `gmaivl_rt.model.constraint.CompiledConstraint` every row must satisfy (its mask applied in
    `decode_step`), a list of them (one per row, None for a free row), or None; logprobs / top_logprobs: record each token's logprob (and the top_logprobs most
    likely) into `trace`, a DecodeTrace that also tells which rows a constraint failed or left incomplete.
    Returns (B, S + new) int64: generation stops when every row has produced an eos or after max_new_tokens."""
    params = SamplingParams(do_sample, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size, min_p)
    max_new_tokens = check_max_new_tokens(max_new_tokens)
    check_context(input_ids.shape[1], max_new_tokens, text_config.context_length)
    stop = StopRule.from_config(text_config, eos_token_id, pad_token_id)
    rows = input_ids.shape[0]
    trace = trace if trace is not None else DecodeTrace()
    trace.logprobs, trace.failed = [[] for _ in range(rows)], [False] * rows
    per_row = list(constraint) if isinstance(constraint, (list, tuple)) else [constraint] * rows
    if len(per_row) != rows:
        raise InputError(f"constraint: {len(per_row)} constraints for {rows} rows")
    matchers = None if all(c is None for c in per_row) else [None if c is None else c.matcher() for c in per_row]
    sequences = input_ids
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    step_logits = prefill()
    for produced in range(1, max_new_tokens + 1):
        allowed = None if matchers is None else constraint_masks(matchers, finished.tolist())
        out = decode_step(step_logits, sequences, finished, params, stop, generator, allowed=allowed,
                          top_logprobs=top_logprobs if logprobs else None)
        for row, (token, done) in enumerate(zip(out.next_tokens.tolist(), finished.tolist())):
            if done or (matchers is None and out.logprobs is None):
                continue
            if bool(out.failed[row]):
                trace.failed[row] = True
                continue
            if matchers is not None and matchers[row] is not None:
                matchers[row].advance(token)
            if out.logprobs is not None:
                trace.logprobs[row].append(TokenLogprob.from_step(out.logprobs, row, token))
        next_tokens, sequences, finished = out.next_tokens, out.sequences, out.finished
        if bool(finished.all()) or produced == max_new_tokens:
            break
        step_logits = step(next_tokens)
    trace.complete = [None] * rows if matchers is None else [None if m is None else m.complete for m in matchers]
    return sequences


def constraint_masks(matchers: list, finished: list) -> torch.Tensor:
    """(B, V) bool constraint masks of the rows still running (one batched computation); finished rows and rows
    without a matcher (None) allow every token."""
    from gmaivl_rt.model.constraint import allowed_tokens

    running = [r for r, done in enumerate(finished) if not done and matchers[r] is not None]
    vocab_size = next(m for m in matchers if m is not None).vocab_size
    allowed = torch.ones(len(matchers), vocab_size, dtype=torch.bool)
    if running:
        allowed[running] = allowed_tokens([matchers[r] for r in running])
    return allowed


def _check_token_ids(value, role: str):
    if value is None:
        return None
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise InputError(f"{role} must be a token id (int >= 0) or a list of them, got {short_repr(value)}")
    return list(value) if isinstance(value, (list, tuple)) else value


def check_generation(options: dict, *, prompt_tokens: int | None, context: int | None,
                     limits: Limits | None = None) -> dict:
    """Validate generation options once for every backend; returns a new dict ready for `generate(**...)`.

    options: any of GENERATION_OPTIONS (unknown names are refused); json_schema / choice / regex come out as one
    `constraint` (`gmaivl_rt.model.constraint.constraint_from_options`), compiled later for the tokenizer;
    logprobs a bool, top_logprobs an int in [0, MAX_TOP_LOGPROBS] (only with logprobs). max_new_tokens: int >= 1
    and at most limits.max_new_tokens; prompt_tokens + max_new_tokens <= context (the model's TextConfig.context_length; None
    skips it). Sampling options are typed and range-checked by `gmaivl_rt.model.sampling.SamplingParams`.
    Raises InputError (bad type or value) or LimitError (over a limit or the context)."""
    limits = limits or DEFAULT_LIMITS
    if not isinstance(options, dict):
        raise InputError(f"generation options must be a dict, got {type_name(options)}")
    unknown = [k for k in options if k not in GENERATION_OPTIONS]
    if unknown:
        raise InputError(f"unknown generation option {short_repr(str(unknown[0]))}; "
                         f"known: {', '.join(GENERATION_OPTIONS)}")
    out = dict(options)
    if "max_new_tokens" not in out:
        raise InputError("max_new_tokens is required")
    out["max_new_tokens"] = check_max_new_tokens(out["max_new_tokens"])
    if out["max_new_tokens"] > limits.max_new_tokens:
        raise LimitError(f"max_new_tokens {out['max_new_tokens']} is over the limit of {limits.max_new_tokens}")
    sampling = SamplingParams(**{k: out[k] for k in SAMPLING_OPTIONS if k in out})
    out.update({k: getattr(sampling, k) for k in SAMPLING_OPTIONS if k in out})
    for key in ("eos_token_id", "pad_token_id"):
        if key in out:
            out[key] = _check_token_ids(out[key], key)
    constraint = constraint_from_options(**{k: out.pop(k) for k in ("json_schema", "choice", "regex", "constraint")
                                            if k in out})
    if constraint is not None:
        out["constraint"] = constraint
    if "logprobs" in out and not isinstance(out["logprobs"], (bool, np.bool_)):
        raise InputError(f"logprobs must be a bool, got {type_name(out['logprobs'])}")
    if "top_logprobs" in out:
        top = _integer(out["top_logprobs"], "top_logprobs")
        if not 0 <= top <= MAX_TOP_LOGPROBS:
            raise InputError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}], got {top}")
        if top and not out.get("logprobs"):
            raise InputError("top_logprobs needs logprobs=True")
        out["top_logprobs"] = top
    if out.get("generator") is not None:
        import torch

        if not isinstance(out["generator"], torch.Generator):
            raise InputError(f"generator must be a torch.Generator, got {type_name(out['generator'])}")
    if prompt_tokens is not None:
        check_context(int(prompt_tokens), out["max_new_tokens"], context)
    return out

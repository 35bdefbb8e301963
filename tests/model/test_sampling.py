"""Next-token selection and stopping against transformers' own logits processors and generate(), not against a
second backend that shares gmaivl_rt.model.sampling.

select_next_token must apply, in transformers' order, RepetitionPenaltyLogitsProcessor, NoRepeatNGramLogitsProcessor,
then (sampling) TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper. Greedy: its argmax equals the argmax of
the processed scores. Sampling: with the same seeded generator it draws exactly what torch.multinomial draws from
the softmax of transformers' processed scores (identical probabilities give identical draws; many rows and a few
seeds make any changed probability show up as a different token).
"""
from __future__ import annotations

import pytest
import torch
from hf_reference import IMAGE_TOKEN, make_hf_llava
from transformers import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from gmaivl_rt import GMAIVL
from gmaivl_rt.errors import InputError, LimitError
from gmaivl_rt.model.sampling import (SamplingParams, apply_repetition_penalty, ban_repeated_ngrams, generate_tokens,
                                select_next_token)

ROWS, VOCAB, SEEN = 256, 40, 24


def _logits_and_history(seed=0):
    """(ROWS, VOCAB) logits of both signs and (ROWS, SEEN) histories drawn from a small alphabet, so repeated
    n-grams (the ban) and seen tokens with positive and negative logits (the penalty's two branches) are common."""
    g = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(ROWS, VOCAB, generator=g)
    history = torch.randint(0, 6, (ROWS, SEEN), generator=g)
    history[:, -2:] = history[:, 3:5]  # every row ends with a bigram it has seen: the 3-gram ban has work to do
    return logits, history


def _hf_scores(logits, history, params: SamplingParams):
    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(params.no_repeat_ngram_size))
    if params.do_sample:
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
        if params.min_p > 0:
            processors.append(MinPLogitsWarper(params.min_p))
    return processors(history, logits.clone())


GREEDY = {
    "penalty": SamplingParams(repetition_penalty=1.8),
    "ngram": SamplingParams(no_repeat_ngram_size=3),
    "bigram": SamplingParams(no_repeat_ngram_size=2),
    "penalty+ngram": SamplingParams(repetition_penalty=1.3, no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("params", GREEDY.values(), ids=GREEDY.keys())
def test_greedy_choice_matches_transformers_processors(params):
    """Mutants: the penalty inverted (`seen * penalty` and `seen / penalty` swapped); the n-gram ban disabled (`if n
    <= 0 or ...: return scores` always returning); the ban's prefix taken one token early. Each changes the argmax
    of many of the 256 rows."""
    logits, history = _logits_and_history()
    want = _hf_scores(logits, history, params).argmax(-1)
    got = select_next_token(logits, history, params)
    assert got.dtype == torch.int64 and got.shape == (ROWS,)
    assert torch.equal(got, want)
    assert not torch.equal(got, logits.argmax(-1)), "the processors must change some choices, or this proves nothing"


SAMPLED = {
    "temperature": SamplingParams(do_sample=True, temperature=0.6),
    "top_k": SamplingParams(do_sample=True, top_k=3),
    "top_p": SamplingParams(do_sample=True, top_p=0.7),
    "min_p": SamplingParams(do_sample=True, min_p=0.2),
    "all": SamplingParams(do_sample=True, temperature=1.4, top_k=8, top_p=0.8, min_p=0.1, repetition_penalty=1.2,
                          no_repeat_ngram_size=3),
}


@pytest.mark.parametrize("params", SAMPLED.values(), ids=SAMPLED.keys())
def test_sampled_choice_matches_transformers_warpers(params):
    """Mutants: top-k removed; the top-p mask inverted (`cumulative > 1 - top_p`); the most likely token no longer
    kept; temperature multiplied instead of divided. Each changes the distribution, so the seeded draws differ."""
    for seed in range(3):
        logits, history = _logits_and_history(seed)
        probs = _hf_scores(logits, history, params).softmax(-1)
        want = torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(seed))[:, 0]
        got = select_next_token(logits, history, params, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, want), f"seed {seed}: {int((got != want).sum())} of {ROWS} rows differ"


def test_sampled_tokens_stay_inside_the_kept_set():
    """Independent of the random stream: every draw is a token transformers' top-k + top-p keeps (mutant: any
    filtering removed lets a dropped token through over 256 rows x 20 draws)."""
    params = SamplingParams(do_sample=True, top_k=5, top_p=0.6)
    logits, history = _logits_and_history(7)
    kept = _hf_scores(logits, history, params).isfinite()
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        got = select_next_token(logits, history, params, generator=generator)
        assert bool(kept.gather(1, got[:, None]).all())


def test_tiny_top_p_keeps_the_most_likely_token():
    """top_p = 1e-9: 1 - top_p rounds to 1.0 in fp32, so every cumulative probability is "below" it; the most
    likely token must still be kept (transformers' min_tokens_to_keep=1), making sampling greedy.
    Mutant: `drop[:, -1] = False` removed (a survivor of the first mutation run): rows lose every token."""
    params = SamplingParams(do_sample=True, top_p=1e-9)
    logits, history = _logits_and_history(2)
    assert torch.equal(_hf_scores(logits, history, params).argmax(-1), logits.argmax(-1))
    got = select_next_token(logits, history, params, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def test_top_p_boundary_and_top_k_above_the_vocabulary():
    """Two survivors of `make mutate`. A cumulative probability exactly at 1 - top_p is dropped (transformers'
    `<=`): uniform logits over 4 tokens give exact quarters, so top_p 0.5 keeps 2 tokens (mutant `<` keeps 3).
    top_k larger than the vocabulary keeps everything (mutant: clamped by the batch size instead of the vocabulary,
    `scores.shape[-0]`, asks topk for more entries than exist)."""
    rows = 64
    uniform, history = torch.zeros(rows, 4), torch.zeros(rows, 1, dtype=torch.long)
    params = SamplingParams(do_sample=True, top_p=0.5)
    kept = _hf_scores(uniform, history, params).isfinite()
    assert bool((kept.sum(-1) == 2).all())
    got = select_next_token(uniform, history, params, generator=torch.Generator().manual_seed(0))
    assert bool(kept.gather(1, got[:, None]).all())

    params = SamplingParams(do_sample=True, top_k=VOCAB + 60)
    logits, history = _logits_and_history(3)
    want = torch.multinomial(_hf_scores(logits, history, params).softmax(-1), 1,
                             generator=torch.Generator().manual_seed(3))[:, 0]
    assert torch.equal(select_next_token(logits, history, params, generator=torch.Generator().manual_seed(3)), want)


# ---------------------------------------------------------------------------------------------- stopping
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("llava")
    hf = make_hf_llava(path)
    return hf, GMAIVL.from_pretrained(path)


def _prompts():
    torch.manual_seed(3)
    a = [5, 17] + [IMAGE_TOKEN] * 4 + [33, 8, 61]
    b = [IMAGE_TOKEN] * 4 + [12]
    ids = torch.zeros(2, len(a), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate((a, b)):
        ids[row, len(a) - len(seq):] = torch.tensor(seq)
        mask[row, len(a) - len(seq):] = 1
    return ids, mask, torch.randn(2, 3, 28, 28)


def test_stop_and_pad_after_an_end_token_match_transformers(models):
    """The model is made to emit the end token: it is a token greedy decoding gives row 0 at a later step (one it
    has not produced before, and row 1 does not produce soon). Row 0 must stop there and be padded while row 1 goes on; generation ends
    when every row has ended or at max_new_tokens; transformers' generate gives the same ids.
    Mutants: eos ignored (`finished |= ...` dropped); finished rows not padded (the `torch.where(finished, ...)`
    dropped); the check for all rows finished dropped (runs to max_new_tokens); pad defaulting to 0 when none is
    given (transformers then pads with the eos)."""
    hf, ours = models
    ids, mask, pixels = _prompts()
    width, steps = ids.shape[1], 12
    free = ours.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=steps, eos_token_id=[],
                         pad_token_id=0)
    new_0, new_1 = free[0, width:].tolist(), free[1, width:].tolist()
    # the first step >= 2 whose token row 0 has not produced before and row 1 does not produce soon after
    end_0 = next(i for i in range(2, steps - 4) if new_0[i] not in new_0[:i] and new_0[i] not in new_1[:i + 3])
    eos = new_0[end_0]
    # a second end token that only row 1 emits, after row 0 has ended
    end_1 = next(i for i in range(end_0 + 1, steps - 1) if new_1[i] not in new_0[:end_0 + 1] + new_1[:i])
    pad = 126
    for row_1_ends in (False, True):
        eos_ids = [eos] + ([new_1[end_1]] if row_1_ends else [])
        for pad_id in (pad, None):
            got = ours.generate(ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=steps,
                                eos_token_id=eos_ids, pad_token_id=pad_id)
            want = hf.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=steps,
                               do_sample=False, eos_token_id=eos_ids, pad_token_id=pad_id)
            assert torch.equal(got, want), (row_1_ends, pad_id)
            filler = pad if pad_id is not None else eos
            assert got[0, width + end_0] == eos and bool((got[0, width + end_0 + 1:] == filler).all())
            if row_1_ends:  # both rows ended: stop as soon as the last one does, not at max_new_tokens
                assert got.shape[1] == width + end_1 + 1 < width + steps
            else:
                assert got.shape[1] == width + steps and torch.equal(got[1], free[1])


# ---- survivors of `make mutate` on gmaivl_rt/model/sampling.py (docs/mutation/mutation-report.md): each test names its mutants


@pytest.mark.parametrize("penalty", [0.5, 1.8, 2.0])
def test_repetition_penalty_scores_match_transformers(penalty):
    """Every score, not only the argmax (a penalised negative logit rarely wins): mutants of the negative branch
    (`seen * penalty` -> `seen + / - / / / // penalty`, `seen < 0` -> `seen < -1`) and of the no-op shortcut
    (`penalty == 1.0` -> `< 1.0`, `<= 1.0`, `== 2.0`)."""
    logits, history = _logits_and_history()
    want = RepetitionPenaltyLogitsProcessor(penalty)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, history, penalty), want, atol=0, rtol=0)


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("length", [2, 3, 4, 5, 24])
def test_ngram_ban_scores_match_transformers_at_every_history_length(n, length):
    """Histories as long as n - 1, n and n + 1 tokens, where the first n-gram appears (mutants: `shape[1] + 1 < n`
    -> `- 1 < n`, `+ 0 < n`, `<= n`, `== n`; the last n-gram start dropped, `range(len(seq) - n * 1)`)."""
    logits, history = _logits_and_history(seed=n)
    history = history[:, :length] % 3  # three symbols: short histories repeat too
    want = NoRepeatNGramLogitsProcessor(n)(history, logits.clone())
    torch.testing.assert_close(ban_repeated_ngrams(logits, history, n), want, atol=0, rtol=0)


@pytest.mark.parametrize("option, value", [("temperature", 0.0), ("temperature", -0.5), ("top_p", 0.0),
                                           ("top_p", -0.5), ("top_p", 1.5), ("repetition_penalty", 0.0),
                                           ("repetition_penalty", -0.5), ("top_k", -1), ("no_repeat_ngram_size", -1),
                                           ("temperature", True), ("top_k", True), ("top_k", 2.0),
                                           ("top_p", float("nan")), ("do_sample", 1), ("min_p", -0.1),
                                           ("min_p", 1.5)])
def test_sampling_params_refuse_out_of_range_values_naming_the_option(option, value):
    """transformers' own ranges (temperature > 0, 0 < top_p <= 1, penalty > 0, ints >= 0; bools are not numbers)
    (mutants: each bound moved by one (`<= 0` -> `< 0`, `<= -1`; `0 < top_p` -> `0 <=`, `-1 <`, `0 !=`; `<= 1` ->
    `<= 2`; `< 0` -> `< -1`), the checks' loops emptied, the bool test `or` -> `and`)."""
    with pytest.raises(InputError, match=option):
        SamplingParams(**{option: value})


def test_top_k_one_samples_the_most_likely_token():
    """Mutant: `if params.top_k > 0` -> `> 1` (top-k 1 not applied)."""
    logits, history = _logits_and_history()
    got = select_next_token(logits, history, SamplingParams(do_sample=True, top_k=1),
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, logits.argmax(-1))


def _counting_model(vocab=7, context=None):
    calls = {"prefill": 0, "step": 0}
    logits = torch.arange(vocab, dtype=torch.float32)[None]  # always token vocab - 1: never an eos below

    def prefill():
        calls["prefill"] += 1
        return logits

    def step(next_tokens):
        calls["step"] += 1
        return logits.expand(next_tokens.shape[0], -1)

    config = type("TextConfig", (), {"eos_token_id": 0, "pad_token_id": 0, "context_length": context})()
    return prefill, step, config, calls


def test_generate_runs_one_forward_per_new_token():
    """A prefill, then one step per new token but the last: no wasted forward (mutant: `produced ==
    max_new_tokens` -> `>`: one more step after the last token)."""
    prefill, step, config, calls = _counting_model()
    out = generate_tokens(prefill, step, torch.zeros(1, 3, dtype=torch.long), config, max_new_tokens=4)
    assert out.tolist() == [[0, 0, 0, 6, 6, 6, 6]]
    assert calls == {"prefill": 1, "step": 3}


def test_generate_checks_the_prompt_length_against_the_context():
    """Prompt length, not batch size (mutant: `check_context(input_ids.shape[0], ...)`)."""
    prefill, step, config, _ = _counting_model(context=8)
    with pytest.raises(LimitError, match="prompt of 6 tokens"):
        generate_tokens(prefill, step, torch.zeros(1, 6, dtype=torch.long), config, max_new_tokens=4)


def test_defaults_process_nothing():
    """Left out, every option is the identity: sampling draws from softmax(logits) itself (as transformers' processors
    at temperature 1, top-p 1, no top-k, penalty 1, no n-gram ban), and generate_tokens makes 32 greedy tokens
    (mutants: the defaults of SamplingParams and of generate_tokens changed: temperature 2.0 / 0.0, top_k 1 / -1,
    top_p 2.0 / 0.0, penalty 2.0 / 0.0, no_repeat_ngram_size 1 / -1, max_new_tokens 31 / 33, do_sample True)."""
    logits, history = _logits_and_history()
    want = torch.multinomial(logits.softmax(-1), 1, generator=torch.Generator().manual_seed(0))[:, 0]
    got = select_next_token(logits, history, SamplingParams(do_sample=True), generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want)

    vocab = 7
    row_logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1))
    config = type("TextConfig", (), {"eos_token_id": [], "pad_token_id": 0, "context_length": None})()
    ids = torch.zeros(1, 3, dtype=torch.long)
    greedy = generate_tokens(lambda: row_logits, lambda t: row_logits, ids, config)
    assert greedy.shape == (1, 3 + 32) and bool((greedy[0, 3:] == row_logits.argmax()).all())
    g = torch.Generator().manual_seed(2)
    sampled = generate_tokens(lambda: row_logits, lambda t: row_logits, ids, config, max_new_tokens=64,
                              do_sample=True, generator=torch.Generator().manual_seed(2))
    expected = [int(torch.multinomial(row_logits.softmax(-1), 1, generator=g)) for _ in range(64)]
    assert sampled[0, 3:].tolist() == expected

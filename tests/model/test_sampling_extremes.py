"""Sampling settings at the edges of what `SamplingParams` accepts: every one gives a token, never a nan.

fp32 rounds a divisor such as 1e-300 to 0.0, so temperature 1e-300 used to turn a row into nan and make
torch.multinomial raise (and end every request batched with it, issue 25). transformers' own warpers fail the same
way (TemperatureLogitsWarper(1e-300) gives nan here too), so the references are the limits these settings describe:
temperature -> 0 is greedy (the argmax), temperature -> inf is uniform, repetition penalty -> 0 makes the seen tokens
with a positive logit win over every other token.
"""
from __future__ import annotations

import pytest
import torch
from transformers import TemperatureLogitsWarper

from gmaivl_rt.model.sampling import SamplingParams, select_next_token

ROWS, VOCAB = 256, 40


def _logits(seed=0):
    """(ROWS, VOCAB) logits with magnitudes well above 4, so that x / 1.2e-38 leaves fp32's range."""
    g = torch.Generator().manual_seed(seed)
    return 8 * torch.randn(ROWS, VOCAB, generator=g), torch.randint(0, VOCAB, (ROWS, 6), generator=g)


def test_transformers_warper_itself_breaks_at_a_tiny_temperature():
    """Why the reference is the limit, not transformers: its warper gives nan rows for temperature 1e-300."""
    logits, _ = _logits()
    assert bool(TemperatureLogitsWarper(1e-300)(None, logits.clone()).softmax(-1).isnan().any())


@pytest.mark.parametrize("temperature", [1e-300, 1e-45, 1e-38, 1e-20])
def test_a_tiny_temperature_samples_the_argmax(temperature):
    """Mutants: the temperature's divisor used as given (0.0 in fp32 for 1e-300) or the scores not shifted by their
    maximum first (x / 1.2e-38 = inf, inf - inf = nan): multinomial raises."""
    logits, history = _logits(1)
    params = SamplingParams(do_sample=True, temperature=temperature)
    for seed in range(3):
        got = select_next_token(logits, history, params, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(got, logits.argmax(-1))


@pytest.mark.parametrize("temperature", [1e30, 1e300])
def test_a_huge_temperature_samples_uniformly(temperature):
    """The draws are exactly torch.multinomial's over a uniform distribution with the same generator."""
    logits, history = _logits(2)
    params = SamplingParams(do_sample=True, temperature=temperature)
    uniform = torch.full((ROWS, VOCAB), 1.0 / VOCAB)
    want = torch.multinomial(uniform, 1, generator=torch.Generator().manual_seed(5))[:, 0]
    got = select_next_token(logits, history, params, generator=torch.Generator().manual_seed(5))
    assert torch.equal(got, want)


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize("penalty", [1e-300, 1e-45])
def test_a_tiny_repetition_penalty_picks_a_seen_token_with_a_positive_logit(penalty, do_sample):
    """penalty -> 0 divides the seen positive logits towards +inf: one of them wins in every row (rows without one
    keep their unseen argmax). Mutant: the penalised scores not clamped below fp32's max: inf rows, then nan."""
    logits, history = _logits(3)
    seen = torch.zeros(ROWS, VOCAB, dtype=torch.bool).scatter(1, history, True)
    favoured = seen & (logits > 0)
    params = SamplingParams(do_sample=do_sample, repetition_penalty=penalty)
    for seed in range(3):
        got = select_next_token(logits, history, params, generator=torch.Generator().manual_seed(seed))
        has = favoured.any(-1)
        assert bool(favoured[has].gather(1, got[has, None]).all())
        assert int(has.sum()) > ROWS // 2


def test_a_huge_repetition_penalty_never_picks_a_seen_token_with_a_negative_logit_over_others():
    """penalty 1e300: the seen negative logits go to -inf, the seen positive ones to 0; greedy takes the best of the
    rest. Reference: the argmax over logits with those two rules applied by hand."""
    logits, history = _logits(4)
    seen = torch.zeros(ROWS, VOCAB, dtype=torch.bool).scatter(1, history, True)
    limit = torch.where(seen & (logits < 0), -float("inf"), torch.where(seen, 0.0, logits))
    got = select_next_token(logits, history, SamplingParams(repetition_penalty=1e300))
    assert torch.equal(got, limit.argmax(-1))

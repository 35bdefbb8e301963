"""`decode_rows` (the serving engine's batched sampling call) against `decode_step` run on each row alone, the
decoding step `generate` runs: rows of different history lengths, GMAI-VL's recommended penalties (repetition
penalty, n-gram ban, top_p), greedy and seeded sampling, logprobs. The rule is the same, so every token, eos flag
and logprob must be equal."""
import torch

from gmaivl_rt.model.sampling import SamplingParams, StopRule, decode_rows, decode_step, pick_token

VOCAB = 40


def _rows():
    """Histories of different lengths whose repeated ids sit where the scores are highest, so the penalty and the
    n-gram ban change the pick; logits with id 0 on top (the padding of a wrongly padded history)."""
    g = torch.Generator().manual_seed(0)
    histories = [[7, 8, 9, 10, 7, 8, 9], [3, 4], [11, 12, 13, 14, 15, 16, 17, 18, 11, 12, 13, 14], [5]]
    logits = torch.randn(len(histories), VOCAB, generator=g)
    for r, history in enumerate(histories):
        logits[r, history] += 2.5
    logits[:, 0] += 3.0
    logits[0, 10] += 4.0  # row 0: the n-gram 7 8 9 10 would repeat: the ban must remove 10
    return histories, logits


def _alone(logits, histories, params, stop, generators, top_logprobs):
    out = []
    for r, history in enumerate(histories):
        step = decode_step(logits[r:r + 1], torch.tensor([history]), torch.zeros(1, dtype=torch.bool), params, stop,
                           None if generators is None else generators[r], top_logprobs=top_logprobs)
        out.append(step)
    return out


def test_batched_rows_equal_each_row_alone_greedy_and_seeded():
    """Mutants: `_ragged_ids` padding with id 0 instead of each row's first id (the short rows' id 0 is penalised:
    another greedy pick); the per-row generators replaced by one draw for the batch (`pick_token` ignoring the
    list: seeded rows differ); `ban_repeated_ngrams` skipping rows of a ragged list (row 0 picks 10). Each seen
    failing."""
    histories, logits = _rows()
    stop = StopRule(eos=[1], pad=2)
    cases = [(SamplingParams(repetition_penalty=1.12, no_repeat_ngram_size=4), None),
             (SamplingParams(do_sample=True, temperature=0.7, top_p=0.9, repetition_penalty=1.12,
                             no_repeat_ngram_size=4), [100, 101, 102, 103]),
             (SamplingParams(do_sample=True, top_k=5), [7, 7, 7, 7])]
    for params, seeds in cases:
        for top_logprobs in (None, 3):
            make = (lambda: None) if seeds is None else (lambda: [torch.Generator().manual_seed(s) for s in seeds])
            batched = decode_rows(logits, histories, params, stop, make(), top_logprobs=top_logprobs)
            alone = _alone(logits, histories, params, stop, make(), top_logprobs)
            assert batched.next_tokens.tolist() == [int(s.next_tokens[0]) for s in alone], (params, top_logprobs)
            assert batched.finished.tolist() == [bool(s.finished[0]) for s in alone]
            if top_logprobs is not None:
                for r, s in enumerate(alone):
                    assert torch.equal(batched.logprobs.chosen[r:r + 1], s.logprobs.chosen)
                    assert torch.equal(batched.logprobs.top_ids[r:r + 1], s.logprobs.top_ids)
                    assert torch.equal(batched.logprobs.top[r:r + 1], s.logprobs.top)
    greedy = decode_rows(logits, histories, cases[0][0], stop).next_tokens.tolist()
    assert greedy[0] != 10  # the n-gram ban acted in the batch (the row's raw argmax is 10)


def test_eos_and_a_row_with_every_token_banned_end_as_alone():
    """A row that picks an eos is finished; a row whose scores are all -inf ends with its first eos, as
    `decode_step` ends an unconstrained row alone. Mutant: `_choose` treating the batch as constrained (pad instead
    of eos): seen failing."""
    logits = torch.zeros(3, VOCAB)
    logits[0, 1] = 9.0                      # picks eos 1
    logits[1] = -float("inf")               # nothing left
    logits[2, 6] = 9.0
    stop = StopRule(eos=[1, 4], pad=2)
    step = decode_rows(logits, [[3], [3, 5], [6, 6]], SamplingParams(), stop)
    alone = _alone(logits, [[3], [3, 5], [6, 6]], SamplingParams(), stop, None, None)
    assert step.next_tokens.tolist() == [int(s.next_tokens[0]) for s in alone] == [1, 1, 6]
    assert step.finished.tolist() == [bool(s.finished[0]) for s in alone] == [True, True, False]


def test_greedy_pick_is_the_first_maximum_and_minus_one_where_nothing_is_left():
    """`pick_token`'s greedy choice (one max reduction) against torch's argmax row by row: ties give the first
    maximum, a NaN row its first NaN (as argmax), a row at +inf its first +inf, and only a row whose every score is
    -inf has no token (-1). Mutants: the -1 fill dropped (the empty row picks 0); rows with an infinite maximum
    taken as empty (`best.isinf()`: the +inf row gets -1). Each seen failing."""
    inf, nan = float("inf"), float("nan")
    scores = torch.tensor([[0.5, 2.0, 2.0, -1.0, 2.0],
                           [-inf, -inf, -inf, -inf, -inf],
                           [1.0, nan, 3.0, nan, -inf],
                           [-inf, -inf, 4.0, -inf, 4.0],
                           [1.0, inf, 0.0, inf, -inf],
                           [7.0, 7.0, 7.0, 7.0, 7.0]])
    picked = pick_token(scores, SamplingParams()).tolist()
    expected = [-1 if bool((row == -inf).all()) else int(row.argmax()) for row in scores]
    assert picked == expected == [1, -1, 1, 2, 1, 0]

"""Chunked prefill (Engine(max_step_tokens=N)): prompts split across steps by the scheduler's per-step token budget
give the same greedy tokens as `GMAIVL.generate` on each request alone, and logits within fp32 reordering of the
unchunked engine's, for text and image prompts, with budgets whose chunks end inside an image's tokens and inside
text; a running request gets a token every step while a long prompt prefills beside it; bad budgets are refused
before the model loads."""
import time

import numpy as np
import pytest
import torch

import gmaivl_rt
from gmaivl_rt import Engine

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head.",
         "You are a careful radiology assistant."] * 20
SYSTEM = "You are a careful radiology assistant. " * 6  # a long prompt: many chunks at a small budget
NO_STOP = {"eos_token_id": []}  # run to max_new_tokens


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "chunked")


def _image(seed):
    return (np.random.RandomState(seed).rand(40, 40, 3) * 255).astype(np.uint8)


CASES = [("What modality is this image?", 1, None), ("Which plane is shown?", None, SYSTEM),
         ("Describe the image.", 2, SYSTEM)]


def _alone(backend, question, image, system, tokens):
    prepared = backend.build_request(question, image, system=system, max_new_tokens=tokens, **NO_STOP)
    out = backend.generate(prepared.input_ids, prepared.pixel_values, **dict(prepared.generation))
    return out[0, prepared.input_ids.shape[1]:].tolist()


def _record(engine):
    """Wrap the runner: per step, the rows (request ids), their feeds, cached counts and image spans; per request,
    the logits of each step that sampled it (rows active)."""
    steps, logits_by_request = [], {}
    run = engine.runner.run

    def recorded(batch):
        logits = run(batch)
        steps.append([(seq.request.id, seq.cached, (batch.feeds or [len(seq.ids) - seq.cached] * len(batch))[r],
                       active, list(seq.image_spans), seq.request.generated_tokens)
                      for r, (seq, active) in enumerate(zip(batch.seqs, batch.active))])
        for r, (seq, active) in enumerate(zip(batch.seqs, batch.active)):
            if active:
                logits_by_request.setdefault(seq.request.id, []).append(logits[r].clone())
        return logits

    engine.runner.run = recorded
    return steps, logits_by_request


def _serve(folder, tokens, **engine_options):
    with Engine(folder, max_batch_size=3, block_size=8, **engine_options) as engine:
        steps, logits = _record(engine)
        requests = [engine.submit(q, image=None if im is None else _image(im), system=s, max_new_tokens=tokens,
                                  **NO_STOP) for q, im, s in CASES]
        for r in requests:
            r.result(timeout=300)
    return [r.token_ids for r in requests], [logits[r.id] for r in requests], steps, requests


def _boundaries(steps):
    """Where chunks ended inside a prompt: (inside an image's tokens, inside text) counts, over all steps."""
    in_image = in_text = 0
    for rows in steps:
        for _, cached, feed, active, spans, _ in rows:
            if active:
                continue  # its prompt's last chunk (or a decode token): no boundary inside the prompt
            end = cached + feed
            if any(start < end < stop for start, stop in spans):
                in_image += 1
            else:
                in_text += 1
    return in_image, in_text


@pytest.mark.parametrize("budget", [3, 20])
def test_chunked_prefill_answers_as_each_request_alone_and_as_unchunked(folder, budget):
    """Three requests (an image prompt, a long text prompt, a long prompt with an image near its end) at budgets
    of 3 and 20 tokens per step: chunks end inside text (both) and inside an image's tokens (budget 3: no chunk
    can step over a 4-token image), no step feeds more than the budget, the
    greedy tokens equal `generate` on each request alone, and every sampled step's logits are within 1e-4 of the
    unchunked engine's.
    Mutants (seen failing): the runner's image features not sliced at the chunk's end (`[first:]`: the model
    refuses features that do not match the image slots); rows sampled before their prompt's last chunk (all rows
    active: the tokens differ); seq.cached advanced to the whole prompt after a chunk (the next chunk is empty: the
    model refuses it); the budget ignored (no chunk boundary inside the prompts)."""
    backend = gmaivl_rt.load(folder)
    alone = [_alone(backend, q, None if im is None else _image(im), s, 6) for q, im, s in CASES]
    plain_tokens, plain_logits, plain_steps, _ = _serve(folder, 6)
    tokens, logits, steps, _ = _serve(folder, 6, max_step_tokens=budget)
    assert tokens == alone == plain_tokens
    for ours, reference in zip(logits, plain_logits):
        assert len(ours) == len(reference) == 6
        for a, b in zip(ours, reference):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    in_image, in_text = _boundaries(steps)
    assert in_text >= 1 and (in_image >= 1 or budget > 3), (in_image, in_text)
    assert all(stop - start == 4 for *_, spans, _ in steps[0] for start, stop in spans)  # the tiny preset's images
    assert _boundaries(plain_steps) == (0, 0)
    assert max(sum(feed for _, _, feed, *_ in rows) for rows in steps) <= budget


def test_a_decoding_request_gets_a_token_every_step_while_a_long_prompt_prefills(folder):
    """Request A decodes; a long prompt with an image (B, ~200 tokens) arrives at a budget of 8 tokens per step: B
    prefills over many steps, and on every step while it does, A feeds its one token and gets the next one; B's
    answer equals `generate` alone.
    Mutants (seen failing): decode rows left out of the budget's reservation (`left = max_step_tokens`: a step
    feeds more than the budget); decode rows marked inactive while a prompt is chunked (A gets no token on those
    steps)."""
    backend = gmaivl_rt.load(folder)
    expected_b = _alone(backend, "Describe the image.", _image(2), SYSTEM, 4)
    with Engine(folder, max_batch_size=2, block_size=8, max_step_tokens=8) as engine:
        steps, _ = _record(engine)
        a = engine.submit("Which plane is shown?", max_new_tokens=120, **NO_STOP)
        deadline = time.time() + 120
        while a.generated_tokens < 2:  # A is decoding before B arrives
            assert not a.done and time.time() < deadline
            time.sleep(0.01)
        b = engine.submit("Describe the image.", image=_image(2), system=SYSTEM, max_new_tokens=4, **NO_STOP)
        assert b.result(timeout=300) is not None
        a.cancel()
    assert b.token_ids == expected_b
    shared = [rows for rows in steps if {r[0] for r in rows} == {a.id, b.id}]
    prefilling = [rows for rows in shared if not next(r for r in rows if r[0] == b.id)[3]]
    assert len(prefilling) >= 20, len(prefilling)  # B's ~200 prompt tokens, 7 a step
    for rows in prefilling:
        assert sum(feed for _, _, feed, *_ in rows) <= 8
        row_a = next(r for r in rows if r[0] == a.id)
        assert row_a[2] == 1 and row_a[3], row_a  # A feeds one token and is sampled
    counts = [next(r for r in rows if r[0] == a.id)[5] for rows in prefilling]
    assert counts == list(range(counts[0], counts[0] + len(counts))), counts  # one more token each step


@pytest.mark.parametrize("budget, message", [
    (0, ">= max_batch_size"), (-3, ">= max_batch_size"), (3, "max_step_tokens (3) must be >= max_batch_size (4)"),
    (2.5, "must be an integer"), (True, "must be an integer"), ("64", "must be an integer")])
def test_bad_budgets_are_refused_before_the_model_loads(tmp_path, budget, message):
    """A budget that is not an integer >= max_batch_size is a ValueError naming max_step_tokens, raised before the
    (here missing) model folder is read; so is any budget on a graph backend (static batches are not chunked).
    Mutants (seen failing): the check after `load` (the missing folder's error instead); bool accepted as an int."""
    with pytest.raises(ValueError, match="max_step_tokens") as caught:
        Engine(tmp_path / "missing", max_batch_size=4, max_step_tokens=budget)
    assert message in str(caught.value)
    with pytest.raises(ValueError, match="max_step_tokens .chunked prefill. needs the torch backend"):
        Engine(tmp_path / "missing", backend="onnx", max_batch_size=4, max_step_tokens=64)

"""One request never harms another, and nothing a caller's event loop does stops the engine.

The references are independent of the engine: each request's tokens from `GMAIVL.generate` on that request alone
(contiguous KV cache, batch of one), and for extreme sampling settings the limit they describe (temperature -> 0 is
greedy). A poison request runs batched with live requests (a slowed runner keeps them in flight while it joins, and
the test checks that they overlapped), so a failure that spreads to its batch shows as a wrong or failed answer.
"""
import asyncio
import threading
import time

import pytest
import torch
from engine_steps import slow_steps

import gmaivl_rt
from gmaivl_rt import Engine

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "An axial slice.", "Describe the image.", "A magnetic resonance image of the head."] * 20
QUESTIONS = ["Which plane is shown?", "Describe the image.", "What modality is this image?", "An axial slice."]
NO_STOP = {"eos_token_id": []}  # run to max_new_tokens
LIVE_TOKENS, POISON_TOKENS = 14, 4


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "isolation")


@pytest.fixture(scope="module")
def backend(folder):
    return gmaivl_rt.load(folder)


def _alone(backend, question, **generation):
    """The generated ids of `GMAIVL.generate` on this request alone (greedy unless `generation` says otherwise)."""
    prepared = backend.build_request(question, None, **generation)
    out = backend.generate(prepared.input_ids, prepared.pixel_values, **dict(prepared.generation))
    return out[0, prepared.input_ids.shape[1]:].tolist()


def _start_live(engine):
    live = [engine.submit(q, max_new_tokens=LIVE_TOKENS, **NO_STOP) for q in QUESTIONS]
    for request in live:  # every live request is decoding before the poison arrives
        next(iter(request))
    return live


def _overlapped(poison, live):
    return all(r.scheduled_time <= poison.finish_time and poison.scheduled_time <= r.finish_time for r in live)


# Sampling settings at the edges of what SamplingParams accepts. fp32 rounds 1e-300 (and 1e-45 after division) to
# a zero divisor: before the fix each of the first three ended every request in its batch with "probability tensor
# contains either inf, nan or element < 0".
EXTREMES = {
    "temperature 1e-300": {"do_sample": True, "temperature": 1e-300},
    "temperature 1e-45": {"do_sample": True, "temperature": 1e-45},
    "penalty 1e-300 sampled": {"do_sample": True, "repetition_penalty": 1e-300},
    "penalty 1e-300 greedy": {"repetition_penalty": 1e-300},
    "temperature 1e300": {"do_sample": True, "temperature": 1e300},
    "top_p 1e-300": {"do_sample": True, "top_p": 1e-300, "temperature": 1e-300},
}


def test_extreme_sampling_settings_among_live_requests_harm_none(folder, backend):
    """Each extreme request answers (a tiny temperature or top_p exactly as greedy decoding alone: the limit of the
    distribution), and the live requests batched with it answer exactly as alone.
    Mutants: the temperature's divisor not kept in fp32's range (`fp32_divisor` returning its argument) fails the
    tiny temperatures and all live requests with them; the max-shift removed fails the tiny temperatures;
    the penalty's clamp removed fails the sampled tiny penalty."""
    expected = {q: _alone(backend, q, max_new_tokens=LIVE_TOKENS, **NO_STOP) for q in QUESTIONS}
    greedy = _alone(backend, "Hi", max_new_tokens=POISON_TOKENS, **NO_STOP)
    with Engine(folder, max_batch_size=8) as engine:
        slow_steps(engine, 0.01)
        for name, options in EXTREMES.items():
            live = _start_live(engine)
            poison = engine.submit("Hi", max_new_tokens=POISON_TOKENS, **NO_STOP, **options)
            poison.result(timeout=60)
            assert poison.finish_reason == "length", name
            for request, question in zip(live, QUESTIONS):
                request.result(timeout=60)
                assert request.token_ids == expected[question], (name, question)
            assert _overlapped(poison, live), f"{name}: the poison request never ran batched with the live ones"
            if "temperature 1e-" in name or "top_p" in name:
                assert poison.token_ids == greedy, name
        assert engine.stats()["running"] == 0 and engine.stats()["kv_blocks_used"] == 0


def test_a_row_whose_logits_cannot_be_sampled_fails_that_request_alone(folder, backend):
    """A row of NaN logits (a broken forward for one request: its sampling raises) ends that request with the error;
    the requests decoded in the same steps answer as alone and the engine keeps serving.
    Seeded sampled requests share the poison's batched sampling call (same settings), which raises: they are
    sampled again row by row from where their generators stood, and answer as alone.
    Mutants: the per-row try/except around `decode_step` in `Engine._step` removed: every live request fails;
    `Engine._sample_rows` not restoring the generators' states: the seeded requests differ. Both seen failing."""
    expected = {q: _alone(backend, q, max_new_tokens=LIVE_TOKENS, **NO_STOP) for q in QUESTIONS}
    seeded = {seed: _alone(backend, QUESTIONS[0], max_new_tokens=LIVE_TOKENS, do_sample=True,
                           generator=torch.Generator().manual_seed(seed), **NO_STOP) for seed in (5, 6)}
    with Engine(folder, max_batch_size=8) as engine:
        run = slow_steps(engine, 0.01)
        live = _start_live(engine)
        sampled = {seed: engine.submit(QUESTIONS[0], max_new_tokens=LIVE_TOKENS, do_sample=True, seed=seed,
                                       **NO_STOP) for seed in seeded}
        for request in sampled.values():
            next(iter(request))
        poison = None

        def poisoned(batch):
            time.sleep(0.01)
            logits = run(batch)
            for r, seq in enumerate(batch.seqs):
                if seq.request is poison:
                    logits[r] = float("nan")
            return logits

        engine.runner.run = poisoned
        poison = engine.submit("Hi", max_new_tokens=POISON_TOKENS, do_sample=True, **NO_STOP)
        with pytest.raises(RuntimeError):
            poison.result(timeout=60)
        assert poison.finish_reason == "error"
        for request, question in zip(live, QUESTIONS):
            request.result(timeout=60)
            assert request.finish_reason == "length" and request.token_ids == expected[question], question
        for seed, request in sampled.items():
            request.result(timeout=60)
            assert request.token_ids == seeded[seed], seed
        assert _overlapped(poison, live) and _overlapped(poison, list(sampled.values()))
        engine.runner.run = run
        assert engine.submit(QUESTIONS[0], max_new_tokens=LIVE_TOKENS, **NO_STOP).result(timeout=60) == \
            backend.tokenizer.decode(expected[QUESTIONS[0]], skip_special_tokens=True).strip()
        assert engine.stats()["running"] == 0 and engine.stats()["kv_blocks_used"] == 0


class _Leave(Exception):
    pass


async def _leave_stream_early(engine, how: str) -> str:
    """Read one delta of a long answer, then leave the stream by `how`, while a second stream of the same loop is
    still being read (asyncio.run cancels it on the way out); returns the delta."""
    async def companion():
        return [d async for d in engine.stream(QUESTIONS[3], max_new_tokens=200, **NO_STOP)]

    asyncio.get_running_loop().create_task(companion())
    stream = engine.stream(QUESTIONS[0], max_new_tokens=200, **NO_STOP)
    if how == "aclose":
        first = await stream.__anext__()
        await stream.aclose()
        return first
    try:
        async for delta in stream:
            if how == "break":
                break
            raise _Leave(delta)
    except _Leave as leave:
        return leave.args[0]
    return delta


@pytest.mark.parametrize("how", ["break", "raise", "aclose"])
def test_leaving_a_stream_then_closing_its_loop_leaves_the_engine_serving(folder, backend, how, monkeypatch):
    """`async for d in engine.stream(...)` left by break / an exception / aclose(), then `asyncio.run` returns (its
    loop is closed) while a request submitted from a thread is being decoded. Each step is slowed so the engine
    reaches the streams' sinks after their loop closed (the report's 'Event loop is closed' from the scheduler
    thread). The live request answers as alone; then 50 requests and one more stream all answer.
    Mutant: `Request._emit` without its try/except: the live request ends with 'Event loop is closed'."""
    died = []
    monkeypatch.setattr(threading, "excepthook", lambda args: died.append(args))
    live_expected = _alone(backend, QUESTIONS[2], max_new_tokens=30, **NO_STOP)
    expected = backend.tokenizer.decode(_alone(backend, QUESTIONS[1], max_new_tokens=3, **NO_STOP),
                                        skip_special_tokens=True).strip()
    with Engine(folder, max_batch_size=4) as engine:
        run = slow_steps(engine, 0.05)
        live = engine.submit(QUESTIONS[2], max_new_tokens=30, **NO_STOP)
        assert asyncio.run(_leave_stream_early(engine, how))
        time.sleep(0.3)  # the scheduler now retires the abandoned requests: their sinks' loop is closed
        engine.runner.run = run
        live.result(timeout=60)
        assert live.finish_reason == "length" and live.token_ids == live_expected
        deadline = time.monotonic() + 30
        while engine.stats()["running"] + engine.stats()["waiting"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert engine.stats()["running"] == engine.stats()["waiting"] == 0
        requests = [engine.submit(QUESTIONS[1], max_new_tokens=3, **NO_STOP) for _ in range(50)]
        assert [r.result(timeout=60) for r in requests] == [expected] * 50

        async def whole():
            return "".join([d async for d in engine.stream(QUESTIONS[1], max_new_tokens=3, **NO_STOP)])

        assert asyncio.run(whole()) == expected
        stats = engine.stats()
    assert not died, [f"{d.thread.name}: {d.exc_type.__name__}: {d.exc_value}" for d in died]
    assert stats["running"] == 0 and stats["kv_blocks_used"] == 0
    assert stats["generated_tokens"] < 2 * 200 + 30 + 51 * 3  # the abandoned answers were cut short


def test_seed_outside_torchs_range_is_refused_as_input(folder):
    """seed 2**64 was torch's ValueError ('Overflow when unpacking long long'), a 500 over HTTP; it is the request's
    bad input (InputError naming the seed), and the ends of torch's range serve reproducibly.
    Mutant: the range check in `seeded_generator` removed: a ValueError without 'seed' in it."""
    from gmaivl_rt.errors import InputError

    with Engine(folder, max_batch_size=2) as engine:
        for seed in (2**64, -2**63 - 1):
            with pytest.raises(InputError, match="seed"):
                engine.submit("Hi", max_new_tokens=2, do_sample=True, seed=seed).result(timeout=30)
        for seed in (2**64 - 1, -2**63):
            twice = [engine.submit("Hi", max_new_tokens=4, do_sample=True, seed=seed, **NO_STOP) for _ in range(2)]
            assert twice[0].result(timeout=30) == twice[1].result(timeout=30)
            assert twice[0].token_ids == twice[1].token_ids and len(twice[0].token_ids) == 4

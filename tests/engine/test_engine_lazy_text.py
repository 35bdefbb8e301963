"""The engine makes a request's text as it is read: a request someone streams (a sink, an iterator, `text`) gets its
new text every step; one only waited on (`result()`) is decoded once, when it ends, unless a stop string may end
it (then its text is still looked at every step). The reference for every answer is the runtime's `ask` on the
request alone (one whole decode, the stop strings cut by `runtime.base.cut_at_stop`), independent of the engine's
streaming; a streamed twin of each request gives the step a stop string ends it at."""
from __future__ import annotations

import time

import pytest
from engine_steps import slow_steps

import gmaivl_rt
from gmaivl_rt import Engine
from gmaivl_rt.engine.sequence import END_OF_ANSWER, Sequence

TEXTS = ["<image>\nWhat modality is this image?", "This is a CT scan of the chest.", "Which plane is shown?",
         "肺部 CT 扫描显示结节。", "Läsion größer als 5 mm.", "An axial slice.", "Is there a fracture?"] * 20
QUESTIONS = ["Which plane is shown?", "Is there a fracture?", "What modality is this image?"]
NO_STOP = {"eos_token_id": [], "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}  # each runs its length
TOKENS = 20


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "engine_lazy_text")


@pytest.fixture(scope="module")
def backend(folder):
    return gmaivl_rt.load(folder)


def _sink(deltas: list):
    def sink(item):
        if item is not END_OF_ANSWER:
            deltas.append(item)
    return sink


def _record_stream_text(monkeypatch) -> list:
    """[(request id, final)] of every `Sequence.stream_text` call from now on."""
    calls = []
    stream_text = Sequence.stream_text

    def recorded(seq, tokenizer, final):
        calls.append((seq.request.id, final))
        return stream_text(seq, tokenizer, final)

    monkeypatch.setattr(Sequence, "stream_text", recorded)
    return calls


def test_a_request_nobody_streams_is_decoded_once_at_its_end_and_answers_as_a_streamed_one(folder, backend,
                                                                                          monkeypatch):
    """Per question a request only waited on and a streamed twin (a sink) run together: the waited-on one's text is
    made once, when it ends (no per-step `stream_text`), the streamed one's every step; both answers equal `ask`'s,
    the deltas join to it, and iterating the finished request afterwards yields its whole text.
    Mutants: `Sequence.streams_each_step` always True (the waited-on requests stream every step); `retire` no
    longer making the final text (the waited-on answers come out empty). Each seen failing."""
    calls = _record_stream_text(monkeypatch)
    with Engine(folder, max_batch_size=8) as engine:
        streamed_deltas = {q: [] for q in QUESTIONS}
        waited = {q: engine.submit(q, max_new_tokens=TOKENS, **NO_STOP) for q in QUESTIONS}
        streamed = {q: engine.submit(q, max_new_tokens=TOKENS, sink=_sink(streamed_deltas[q]), **NO_STOP)
                    for q in QUESTIONS}
        answers = {q: waited[q].result(timeout=120) for q in QUESTIONS}
        for q in QUESTIONS:
            streamed[q].result(timeout=120)
    for q in QUESTIONS:
        expected = backend.ask(q, max_new_tokens=TOKENS, **NO_STOP)
        assert expected, "the reference answer is empty: the test would not see a missing text"
        assert answers[q] == streamed[q].result() == "".join(streamed_deltas[q]) == expected, q
        assert [final for rid, final in calls if rid == waited[q].id] == [True], q
        assert [final for rid, final in calls if rid == streamed[q].id].count(False) == TOKENS - 1, q
        assert list(waited[q]) == [expected]  # iterated after its end: its whole text, once


def test_stop_strings_end_a_request_nobody_streams_at_the_step_they_end_a_streamed_one(folder, backend):
    """A stop string taken from the middle of an answer: the request only waited on stops at the same token as its
    streamed twin (finish "stop", the same generated ids), and both answers equal `ask`'s with that stop string
    (cut before it). Mutant: `Sequence.streams_each_step` ignoring stop strings (the waited-on request runs to
    max_new_tokens, its text cut only at the end): seen failing."""
    question = QUESTIONS[0]
    whole = backend.ask(question, max_new_tokens=TOKENS, **NO_STOP)
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    assert len(whole) > 6 and stop.strip() and whole.find(stop) > 0, whole
    expected = backend.ask(question, max_new_tokens=TOKENS, stop=[stop], **NO_STOP)
    with Engine(folder, max_batch_size=4) as engine:
        deltas = []
        waited = engine.submit(question, max_new_tokens=TOKENS, stop=[stop], **NO_STOP)
        streamed = engine.submit(question, max_new_tokens=TOKENS, stop=[stop], sink=_sink(deltas), **NO_STOP)
        assert waited.result(timeout=120) == streamed.result(timeout=120) == "".join(deltas) == expected
    assert waited.finish_reason == streamed.finish_reason == "stop"
    assert waited.token_ids == streamed.token_ids and waited.generated_tokens < TOKENS


def test_a_request_read_partway_streams_from_then_on_and_joins_to_its_answer(folder, backend):
    """Iteration starts when the request is a few tokens in (steps slowed so it is still running): the deltas
    keep coming step by step from then on (several, not the whole answer at the end) and join to `ask`'s answer.
    Mutant: `Request.__iter__` not marking the request streamed (one delta at its end): seen failing."""
    question = QUESTIONS[1]
    tokens = 24
    with Engine(folder, max_batch_size=4) as engine:
        slow_steps(engine, 0.02)
        request = engine.submit(question, max_new_tokens=tokens, **NO_STOP)
        deadline = time.monotonic() + 60
        while request.generated_tokens < 4 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not request.done
        deltas = list(request)
    assert len(deltas) > 2, deltas
    assert "".join(deltas) == request.result() == backend.ask(question, max_new_tokens=tokens, **NO_STOP)


def test_text_that_cannot_be_decoded_at_the_end_fails_that_request_alone(folder, backend):
    """A request nobody streams meets its first decode when it ends: a decode that raises there fails that request
    (finish "error", the error raised from result()), whether it ended by its length or was cancelled, while the
    request running beside it answers as `ask`, and the engine goes on serving. Mutant: `Scheduler.retire` without
    its try/except around the final text (the cancelled request's error leaves the step: it never finishes and the
    one beside it fails too): seen failing."""
    broken = []

    with Engine(folder, max_batch_size=4) as engine:
        tokenizer = engine.tokenizer
        decode = tokenizer.decode

        def failing(ids, *args, **kwargs):
            if any(list(ids) == request.token_ids for request in broken):
                raise ValueError("cannot decode")
            return decode(ids, *args, **kwargs)

        tokenizer.decode = failing
        try:
            slow_steps(engine, 0.01)
            beside = engine.submit(QUESTIONS[1], max_new_tokens=24, **NO_STOP)
            broken.append(engine.submit(QUESTIONS[0], max_new_tokens=6, **NO_STOP))
            broken.append(engine.submit(QUESTIONS[2], max_new_tokens=24, **NO_STOP))
            deadline = time.monotonic() + 60
            while broken[1].generated_tokens < 8 and time.monotonic() < deadline:
                time.sleep(0.005)
            broken[1].cancel()
            for request in broken:
                with pytest.raises(ValueError, match="cannot decode"):
                    request.result(timeout=120)
                assert request.finish_reason == "error"
            assert beside.result(timeout=120) == backend.ask(QUESTIONS[1], max_new_tokens=24, **NO_STOP)
            assert beside.finish_reason == "length"
            assert all(beside.scheduled_time <= r.finish_time <= beside.finish_time for r in broken)  # beside it
        finally:
            del tokenizer.decode
        assert engine.ask(QUESTIONS[2], max_new_tokens=6, **NO_STOP) == backend.ask(QUESTIONS[2], max_new_tokens=6,
                                                                                  **NO_STOP)
        assert engine.stats()["running"] == 0

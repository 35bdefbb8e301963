"""A server stopped while requests are mid-answer (issue 25): uvicorn's graceful period runs out and it cancels the
request tasks. Each engine request is then cancelled (its slot and KV blocks freed, not decoded to its end), each
HTTP request is counted once in /metrics as `cancelled`, nothing is logged as an internal error, and the engine goes
on serving the next server. Real uvicorn on a free loopback port, httpx as the client."""
from __future__ import annotations

import json
import threading

import pytest
from engine_steps import slow_steps

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from prometheus_client import generate_latest  # noqa: E402
from server_fixtures import LogRecorder, wait_until  # noqa: E402

from gmaivl_rt import Engine  # noqa: E402
from gmaivl_rt.server import create_app  # noqa: E402
from gmaivl_rt.server.background import BackgroundServer  # noqa: E402

MODEL = "tiny-shutdown"
TOKENS = 200
QUESTION = "Describe the image."


def counted(app, outcome: str) -> float:
    """gmaivl:requests_total{outcome=...} of the app's metrics (read from its registry: the server is gone)."""
    text = generate_latest(app.state.metrics.registry).decode()
    line = next((line for line in text.splitlines()
                 if line.startswith("gmaivl:requests_total{") and f'outcome="{outcome}"' in line), None)
    return 0.0 if line is None else float(line.rsplit(" ", 1)[1])


def test_a_server_stopped_mid_answer_cancels_and_counts_its_requests(serving_folder):
    """A stream (first chunk read) and a non-streamed request, both mid-answer on an engine with slowed steps, when
    the server is told to stop with a 1 s graceful period: both engine requests end "cancelled" well before
    TOKENS tokens, the engine has nothing left running, the non-streamed client gets a 503 JSON error and the stream
    a 503 error event then [DONE], /metrics counts 2 cancelled and nothing else, nothing is logged as an error, and
    a new server on the same engine answers as the engine alone does. (Before: uvicorn answered the non-streamed
    request 500 and logged the CancelledError's traceback, and the stream was cut without [DONE].)
    Mutants (each seen failing): `InternalErrors` without its CancelledError branch (the 500 and traceback above);
    `RequestOutcome.result` ignoring `stopped` (the 503 counted server_error: cancelled 1); `sse_events` not
    cancelling its generation on the way out (its request then ends only when the engine finds the closed loop:
    not asked to stop by the server); `finish_unstreamed` not cancelling."""
    body = {"model": MODEL, "max_tokens": TOKENS, "temperature": 0,
            "messages": [{"role": "user", "content": QUESTION}]}
    with Engine(serving_folder, backend="torch", max_batch_size=4) as engine:
        alone = engine.submit(QUESTION, max_new_tokens=TOKENS, do_sample=False)
        expected = alone.result(300)
        # precondition: the answer runs all TOKENS tokens (no early eos), so it is mid-answer when the server stops
        assert alone.generated_tokens == TOKENS, alone.generated_tokens
        submitted = []
        submit = engine.submit

        def recording_submit(*args, **kwargs):
            submitted.append(submit(*args, **kwargs))
            return submitted[-1]

        engine.submit = recording_submit
        restore = slow_steps(engine, 0.05)
        app = create_app(engine, served_model_name=MODEL)
        outcomes = {}

        def streamed():
            try:
                with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True},
                                  timeout=120) as response:
                    lines = []
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            lines.append(line)
                            first_chunk.set()
                outcomes["streamed"] = lines[-2:]
            except httpx.HTTPError as error:
                outcomes["streamed"] = type(error).__name__

        def whole():
            try:
                response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                is_json = response.headers.get("content-type", "").startswith("application/json")
                outcomes["whole"] = response.status_code, response.json() if is_json else response.text
            except httpx.HTTPError as error:
                outcomes["whole"] = type(error).__name__

        first_chunk = threading.Event()
        with LogRecorder() as log:
            server = BackgroundServer(app, stop_timeout_s=1, log_level="info")
            log.__enter__()  # uvicorn's logging set-up replaced the handlers: attach again
            with server:
                threads = [threading.Thread(target=target) for target in (streamed, whole)]
                for thread in threads:
                    thread.start()
                assert first_chunk.wait(120), "the stream sent no chunk"
                wait_until(lambda: len(submitted) == 2 and all(r.generated_tokens >= 2 for r in submitted),
                           timeout=120, what="both requests mid-answer")
            # asked to stop by the server as it stopped (not only later, by the engine, when a delta finds the
            # server's event loop closed)
            cancelled_by_the_server = [r.cancel_requested for r in submitted]
            for thread in threads:
                thread.join(120)
        wait_until(lambda: all(r.done for r in submitted), timeout=60, what="both engine requests ended")
        stats = engine.stats()
        engine.submit = submit
        engine.runner.run = restore
        # the engine goes on serving: a new server on it answers as the engine alone does
        with BackgroundServer(create_app(engine, served_model_name=MODEL)) as again:
            after = httpx.post(again.url + "/v1/chat/completions", json=body, timeout=300)
    assert cancelled_by_the_server == [True, True]
    assert [r.finish_reason for r in submitted] == ["cancelled", "cancelled"]
    assert all(r.generated_tokens < TOKENS for r in submitted), [r.generated_tokens for r in submitted]
    assert (stats["running"], stats["waiting"]) == (0, 0)
    assert counted(app, "cancelled") == 2
    assert sum(counted(app, o) for o in ("success", "client_error", "server_error")) == 0
    # the clients were told: a 503 for the non-streamed one, a 503 error event then [DONE] closing the stream
    shutting_down = {"error": {"message": "the server is shutting down; retry later", "type": "ServiceUnavailable",
                               "param": None, "code": 503}}
    assert outcomes["whole"] == (503, shutting_down), outcomes
    assert outcomes["streamed"] == ["data: " + json.dumps(shutting_down, separators=(",", ":")), "data: [DONE]"]
    assert "internal error" not in log.text and "Traceback" not in log.text
    assert "Exception in ASGI application" not in log.text and "without completing" not in log.text
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected

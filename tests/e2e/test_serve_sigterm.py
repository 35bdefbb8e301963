"""`gmaivl-rt serve` as a real process, stopped with SIGTERM (what systemd, docker and kubernetes send) while streams
with long answers are open (issue 25): the stop is bounded. The open streams end (a 503 error event and [DONE], or
the connection closed), the engine is closed, the process exits 0 within a few seconds, and nothing on its stderr
is a traceback. httpx as the client; the server dies with the test process."""
from __future__ import annotations

import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from server_fixtures import TEXTS, wait_until, wait_until_serving  # noqa: E402

from gmaivl_rt.processes import ends_with_parent, free_port  # noqa: E402
from gmaivl_rt.server.hosting import GRACEFUL_SHUTDOWN_S  # noqa: E402

STREAMS = 4
MAX_TOKENS = 4000  # the most one request may ask (Limits); far more than the tiny model makes within the bound
EXIT_BOUND_S = GRACEFUL_SHUTDOWN_S + 10  # the grace period, then the cancelled streams' ends and the engine's close
CHUNKS_BEFORE_SIGTERM = 5
START_SECONDS = 180
QUESTION = "Describe the image."



def test_sigterm_with_open_streams_ends_them_and_exits_0_in_bounded_time(tiny_model_folder, start_child):
    """STREAMS streams asking for MAX_TOKENS tokens each, all mid-answer (CHUNKS_BEFORE_SIGTERM chunks read, none
    ended), then SIGTERM: within EXIT_BOUND_S seconds the process has exited with code 0 and every stream has ended
    (its last event a 503 error and [DONE], or its connection closed, never left hanging); its stderr holds no
    traceback. Mutants (each seen failing): `hosting.uvicorn_config` without `timeout_graceful_shutdown` (the old
    `serve`: uvicorn waits for every stream to reach its end: still running at the bound); `serve_until_stopped`
    without its signal handlers (uvicorn raises SIGTERM again once stopped: the process dies of it, exit -15,
    the engine never closed)."""
    # seed 3: greedy answers to QUESTION that run to max_tokens (with seed 0 they end after 445 tokens)
    folder = tiny_model_folder(TEXTS, "serve_sigterm", seed=3, text={"max_position_embeddings": 8192})
    port = free_port()
    child = start_child(["serve", folder, "--host", "127.0.0.1", "--port", port, "--served-model-name", "tiny",
                         "--max-batch-size", STREAMS], **ends_with_parent())
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(child, url, START_SECONDS)
    body = {"model": "tiny", "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": QUESTION}]}
    chunks = [0] * STREAMS
    endings: list = [None] * STREAMS

    def stream(i: int) -> None:
        last = []
        try:
            with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
                if response.status_code != 200:
                    endings[i] = (response.status_code, response.read().decode())
                    return
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        chunks[i] += 1
                        last = [*last[-1:], line]
            endings[i] = last
        except httpx.HTTPError as error:  # the connection closed under it: an ending too
            endings[i] = type(error).__name__

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(STREAMS)]
    for thread in threads:
        thread.start()
    wait_until(lambda: min(chunks) >= CHUNKS_BEFORE_SIGTERM or any(e is not None for e in endings), timeout=120,
               what="every stream mid-answer")
    assert endings == [None] * STREAMS, f"a stream ended before SIGTERM (the test needs long answers): {endings}"
    child.process.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    chunks_at_sigterm = list(chunks)
    try:
        code = child.process.wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"serve had not exited {EXIT_BOUND_S} s after SIGTERM with {STREAMS} streams open; "
                             f"chunks read so far: {chunks}") from None
    took = time.monotonic() - sent
    for thread in threads:
        thread.join(10)
    stderr = Path(child.stderr_file).read_text()
    assert code == 0, child.why()
    assert not any(thread.is_alive() for thread in threads), f"a stream still open after the exit: {endings}"
    error_end = [('data: {"error":{"message":"the server is shutting down; retry later","type":"ServiceUnavailable",'
                  '"param":null,"code":503}}'), "data: [DONE]"]
    assert all(ending == error_end or isinstance(ending, str) for ending in endings), endings
    assert "Traceback" not in stderr and "Exception in ASGI application" not in stderr, stderr[-3000:]
    print(f"exited {took:.1f} s after SIGTERM; chunks at SIGTERM {chunks_at_sigterm}, at the end {chunks}")

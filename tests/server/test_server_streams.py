"""Many streams at once hold no HTTP worker thread (issue 25): an answer's deltas reach the event loop from the
engine's threads (`generation.LoopDeltas`), so 64 streams, most of them queued in the engine, leave the thread pool
to the requests that need it (image intake, preview); and a large JSON body is parsed off the event loop with the
answers FastAPI gives (`server.body`). Real uvicorn servers on free loopback ports, httpx as the client."""
from __future__ import annotations

import asyncio
import io
import json
import threading

import numpy as np
import pytest
from engine_steps import slow_steps

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from fastapi import Request  # noqa: E402
from PIL import Image  # noqa: E402
from server_fixtures import data_uri, wait_until  # noqa: E402

from gmaivl_rt import Engine  # noqa: E402
from gmaivl_rt.server import body as body_module  # noqa: E402
from gmaivl_rt.server import create_app, protocol  # noqa: E402

MODEL = "tiny-streams"
STREAMS, BATCH, TOKENS = 64, 8, 48
QUESTION = "Describe the image."


def small_png() -> str:
    buffer = io.BytesIO()
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 256).astype(np.uint8)).save(buffer, format="PNG")
    return data_uri(buffer.getvalue(), "image/png")


def borrowed_threads(loop) -> float:
    """Tokens of anyio's default thread limiter (the pool `run_in_threadpool` uses) in use on the server's loop."""
    async def read():
        import anyio.to_thread

        return anyio.to_thread.current_default_thread_limiter().borrowed_tokens

    return asyncio.run_coroutine_threadsafe(read(), loop).result(30)


def test_64_streams_leave_the_thread_pool_to_health_and_preview(serving_folder, serve):
    """64 streams of TOKENS tokens against an engine decoding BATCH at a time (slowed steps, so the first BATCH
    are mid-answer for seconds while the other 56 wait in the engine's queue): /health and a preview (which reads
    its image in the HTTP thread pool) are answered while the engine has finished none of them; then every stream
    ends with [DONE] and the answer the same request gets alone. A timing-free check of starvation (orderings in the
    engine, no latency threshold). Mutant: a worker thread blocked per stream (the previous commit's
    `run_in_threadpool(next, ...)` per delta, run in a copy of the tree): the streams queued in the engine take all
    40 threads, so the later streams cannot even be submitted (that hop needs a thread) until the first ones have
    finished: failed with "only 60 of 64 streams reached the engine before the first finished (40 worker
    threads in use)"."""
    with Engine(serving_folder, backend="torch", max_batch_size=BATCH) as engine:
        app = create_app(engine, served_model_name=MODEL)
        loops = []

        async def loop_catcher(scope, receive, send):  # the server's event loop, to read its thread limiter
            if not loops:
                loops.append(asyncio.get_running_loop())
            await app(scope, receive, send)

        body = {"model": MODEL, "max_tokens": TOKENS, "temperature": 0,
                "messages": [{"role": "user", "content": QUESTION}]}
        with serve(loop_catcher) as server:
            alone = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120).json()
            # precondition: this prompt's greedy answer runs all TOKENS tokens (no early eos): the streams are long
            assert alone["usage"]["completion_tokens"] == TOKENS, alone["usage"]
            slow_steps(engine, 0.03)
            finished_before = engine.stats()["finished"]
            answers, errors = [], []

            def stream():
                try:
                    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=600,
                                      json={**body, "stream": True}) as response:
                        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
                    text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
                                   for line in lines[:-1])
                    answers.append((response.status_code, lines[-1], text))
                except Exception as error:  # reported by the assertion below
                    errors.append(repr(error))

            threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
            for thread in threads:
                thread.start()
            # every stream in the engine, the first BATCH a third of the way through their answers (or, where
            # streams hold worker threads, the first ones finished before the rest could even be submitted)
            def in_engine():
                stats = engine.stats()
                return stats["running"] + stats["waiting"], stats["generated_tokens"], stats["finished"]

            wait_until(lambda: in_engine()[2] > finished_before or (
                in_engine()[0] == STREAMS and in_engine()[1] >= TOKENS + BATCH * TOKENS // 3),
                timeout=120, what="64 streams in the engine, the first ones mid-answer")
            submitted, _, finished = in_engine()
            all_submitted_early = submitted == STREAMS and finished == finished_before
            with httpx.Client(base_url=server.url, timeout=300) as client:
                health = client.get("/health")
                preview = client.post("/v1/gmaivl/preview", json={"image_url": {"url": small_png()}})
            finished_at_answer = engine.stats()["finished"] - finished_before
            threads_in_use = borrowed_threads(loops[0])
            for thread in threads:
                thread.join(600)
    assert all_submitted_early, (f"only {submitted} of {STREAMS} streams reached the engine before the first "
                                 f"finished ({threads_in_use} worker threads in use)")
    assert health.status_code == 200
    assert preview.status_code == 200, preview.text
    assert finished_at_answer == 0, (f"/health and the preview waited until {finished_at_answer} streams had "
                                     f"finished ({threads_in_use} worker threads in use)")
    assert not errors, errors
    assert len(answers) == STREAMS
    expected = alone["choices"][0]["message"]["content"]
    assert {(status, last) for status, last, _ in answers} == {(200, "data: [DONE]")}
    assert [text for _, _, text in answers] == [expected] * STREAMS


# bodies as a client might send them: valid, invalid JSON, a lone surrogate escape, NaN, a byte order mark,
# UTF-16, not UTF at all, a wrong type, an unknown field, empty
BODIES = {
    "valid": json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode(),
    "bad JSON": b'{"messages": [{"role": "user", "content": "Hi"}',
    "lone surrogate escape": b'{"messages": [{"role": "user", "content": "Hi \\ud800"}], "max_tokens": 2}',
    "NaN": b'{"messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
    "byte order mark": b'\xef\xbb\xbf{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}',
    "UTF-16": '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'.encode("utf-16"),
    "not UTF": b'{"messages": [{"role": "user", "content": "Hi \xff"}]}',
    "wrong type": b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": true}',
    "unknown field": b'{"messages": [{"role": "user", "content": "Hi"}], "frobnicate": 1}',
    "a list": b'[1, 2]',
    "empty": b"",
}


@pytest.mark.parametrize("name", list(BODIES))
def test_a_large_body_gets_the_answer_fastapi_gives(serving_engine, name):
    """Each body, as sent and padded with trailing spaces past OFF_LOOP_BYTES (so it is parsed in a worker thread by
    pydantic's JSON reader), gets the status and error this server gave when FastAPI parsed it (a route taking the
    body as a FastAPI parameter, answered through the same error handlers).
    Mutant (seen failing): no second reading after pydantic's refusal (its ValidationError raised as it is): the 9
    refused bodies got 500s. The 'body' prefix of the locations left off is an equivalent mutant (the client's
    message drops it; kept so the error is FastAPI's own shape)."""
    from fastapi.testclient import TestClient

    app = create_app(serving_engine, served_model_name=MODEL)

    @app.post("/fastapi-parsed")
    async def fastapi_parsed(body: protocol.ChatCompletionRequest):
        return {"parsed": body.model_dump(mode="json", by_alias=True)}

    @app.post("/ours")
    async def ours(http_request: Request):
        body = await body_module.parsed_body(http_request, protocol.ChatCompletionRequest)
        return {"parsed": body.model_dump(mode="json", by_alias=True)}

    raw = BODIES[name]
    padding = {"empty": b"", "UTF-16": " ".encode("utf-16-le")}.get(name, b" ") * body_module.OFF_LOOP_BYTES
    statuses = {}
    with TestClient(app) as client:
        for content_type in ("application/json", None, "text/plain"):
            headers = {"Content-Type": content_type} if content_type else {}
            expected = client.post("/fastapi-parsed", content=raw, headers=headers)
            statuses[content_type] = expected.status_code
            for sent in (raw, raw + padding):
                got = client.post("/ours", content=sent, headers=headers)
                assert (got.status_code, got.json()) == (expected.status_code, expected.json()), (
                    name, content_type, len(sent))
    # the bodies refused as JSON are refused, the valid one is answered; none is JSON without the JSON type
    assert statuses == {"application/json": 200 if name in ("valid", "byte order mark", "UTF-16") else 400,
                        None: 400, "text/plain": 400}


def test_a_large_body_is_parsed_in_a_worker_thread(monkeypatch):
    """A body of OFF_LOOP_BYTES or more is parsed off the event loop's thread, a smaller one on it (a thread hop
    costs more than a small parse). Mutant (seen failing): the size check dropped, every body parsed on the loop."""
    threads = []
    parse = body_module.parse_body

    def recording(*args):
        threads.append(threading.current_thread())
        return parse(*args)

    monkeypatch.setattr(body_module, "parse_body", recording)

    class FakeRequest:  # what parsed_body reads of a starlette Request
        def __init__(self, raw):
            self.raw, self.headers = raw, {"content-type": "application/json"}

        async def body(self):
            return self.raw

    small = json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()
    large = json.dumps({"messages": [{"role": "user", "content": "x" * body_module.OFF_LOOP_BYTES}]}).encode()

    async def both():
        loop_thread = threading.current_thread()
        parsed = [await body_module.parsed_body(FakeRequest(raw), protocol.ChatCompletionRequest)
                  for raw in (small, large)]
        return loop_thread, parsed

    loop_thread, parsed = asyncio.run(both())
    assert [p.messages[0].content for p in parsed] == ["Hi", "x" * body_module.OFF_LOOP_BYTES]
    assert threads[0] is loop_thread and threads[1] is not loop_thread


def test_a_burst_of_deltas_wakes_the_loop_once_and_keeps_each_streams_order():
    """An engine step hands a delta to every row from its thread: 16 streams x 3 deltas and their ends, posted while
    the event loop is busy, reach the loop in ONE wake-up (`call_soon_threadsafe`), each stream's deltas in order,
    none lost; after the loop is closed a sink raises (the engine then cancels the request). Mutant (seen failing):
    a wake-up per delta (`wake = True` in `_LoopMailbox.post`, what `LoopDeltas` did before): 64 wake-ups."""
    from gmaivl_rt.engine.sequence import END_OF_ANSWER
    from gmaivl_rt.server.generation import LoopDeltas

    wakeups = []

    class CountingLoop(asyncio.SelectorEventLoop):
        def call_soon_threadsafe(self, *args, **kwargs):
            wakeups.append(threading.current_thread())
            return super().call_soon_threadsafe(*args, **kwargs)

    async def burst():
        streams = [LoopDeltas() for _ in range(16)]
        posted = threading.Event()

        def engine_step():  # the engine's thread: three steps' deltas while the loop is busy, then the ends
            for step in range(3):
                for i, deltas in enumerate(streams):
                    deltas.sink(f"{i}:{step} ")
            for deltas in streams:
                deltas.sink(END_OF_ANSWER)
            posted.set()

        thread = threading.Thread(target=engine_step)
        thread.start()
        posted.wait(30)  # the loop's thread blocked meanwhile: nothing is delivered until it runs again
        thread.join(30)
        received = []
        for deltas in streams:
            items = []
            while (item := await asyncio.wait_for(deltas.get(), 30)) is not END_OF_ANSWER:
                items.append(item)
            received.append(items)
        return streams, received

    loop = CountingLoop()
    try:
        streams, received = loop.run_until_complete(burst())
    finally:
        loop.close()
    assert received == [[f"{i}:{step} " for step in range(3)] for i in range(16)]
    assert len(wakeups) == 1, f"{len(wakeups)} wake-ups of the event loop for one burst of 64 deltas"
    with pytest.raises(RuntimeError):
        streams[0].sink("after the loop closed")

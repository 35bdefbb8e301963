"""/metrics counts what went wrong as well as what went right: every chat request once by its outcome (success,
cancelled, client_error, server_error), the tokens of every request that reached the engine, queue time, time per
output token and image decode time. Read with prometheus_client's own text parser from a real server on a free
loopback port; the clients are httpx and the official `openai` client."""
from __future__ import annotations

import threading
import time

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from server_fixtures import QUESTION, TEXTS, data_uri  # noqa: E402

from gmaivl_rt import Engine  # noqa: E402
from gmaivl_rt.server import create_app  # noqa: E402
from gmaivl_rt.server.background import BackgroundServer  # noqa: E402

MODEL = "tiny-metrics"
MAX_REQUEST_BYTES = 200_000
BROKEN, BROKEN_MID_STREAM = "Describe the image.", "An axial slice."  # the questions whose forward is made to fail


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "metrics_model")


@pytest.fixture(scope="module")
def engine(folder):
    with Engine(folder, backend="torch", max_batch_size=8) as engine:
        yield engine


@pytest.fixture(scope="module")
def server(engine):
    app = create_app(engine, served_model_name=MODEL, max_request_bytes=MAX_REQUEST_BYTES)
    with BackgroundServer(app) as running:
        yield running


def scrape(server) -> dict:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def outcomes(samples) -> dict:
    return {o: samples.get(("gmaivl:requests_total", (("outcome", o),)), 0.0)
            for o in ("success", "cancelled", "client_error", "server_error")}


def moved(before, after) -> dict:
    return {k: after[k] - before[k] for k in after}


def wait_for_outcomes(server, before, want_total, timeout=30.0) -> dict:
    """Outcomes moved since `before`, once `want_total` requests are counted (a disconnect is counted when the
    server notices it, a moment after the client left)."""
    deadline = time.monotonic() + timeout
    while True:
        got = moved(outcomes(before), outcomes(scrape(server)))
        if sum(got.values()) >= want_total or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def chat(question=QUESTION, **fields) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": question}], "max_tokens": 6, "temperature": 0,
            **fields}


def leave_after_first_token(server, errors):
    """Open a stream, read until its first content token, hang up (the answer is far from done)."""
    try:
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=chat(max_tokens=300, stream=True),
                          timeout=60) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                assert "[DONE]" not in line, "the stream ended before the client left"
                if '"content":"' in line and '"content":""' not in line:
                    return
    except BaseException as error:  # noqa: BLE001 - reported by the test
        errors.append(error)


@pytest.fixture
def broken_forward(engine):
    """The engine's forward fails for BROKEN at once and for BROKEN_MID_STREAM after 2 generated tokens (a server
    fault in one request; the engine runs the rows alone, so only that request fails)."""
    run = engine.runner.run

    def failing(batch):
        for seq in batch.seqs:
            prompt = engine.tokenizer.decode(seq.ids[:seq.prompt_len])
            if BROKEN in prompt or (BROKEN_MID_STREAM in prompt and len(seq.generated) >= 2):
                raise RuntimeError("forward failed")
        return run(batch)

    engine.runner.run = failing
    yield
    engine.runner.run = run


def test_disconnected_streams_and_failed_requests_are_counted(server, engine, broken_forward):
    """20 streams left after their first token count as cancelled; 400 (bad JSON, a bad parameter, a bad image),
    413 (too big) and 404 (unknown model) as client errors; a 500 and a stream failing midway as server errors;
    an ordinary answer as a success. The tokens of every request the engine ran are counted, the cancelled ones'
    included (the engine's own counters bound them).
    Mutants: `OutcomeCounter` not added to the app: nothing moves; `Generation.outcome` always "success": the
    cancelled and mid-stream failures are counted as successes; `observe_ended` returning before the token
    counters for non-successes: the prompt tokens fall short of the engine's."""
    before, engine_before = scrape(server), engine.stats()
    errors: list = []
    threads = [threading.Thread(target=leave_after_first_token, args=(server, errors)) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and not any(t.is_alive() for t in threads), errors[:3]

    url = server.url + "/v1/chat/completions"
    assert httpx.post(url, content=b"{not json", headers={"Content-Type": "application/json"},
                      timeout=30).status_code == 400
    assert httpx.post(url, json=chat(temperature=-1), timeout=30).status_code == 400
    bad_image = [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": data_uri(b"not an image at all", "image/png")}}, {"type": "text", "text": QUESTION}]}]
    assert httpx.post(url, json={**chat(), "messages": bad_image}, timeout=30).status_code == 400
    assert httpx.post(url, json=chat(QUESTION + " " * MAX_REQUEST_BYTES), timeout=30).status_code == 413
    assert httpx.post(url, json=chat(model="no-such-model"), timeout=30).status_code == 404
    broken = httpx.post(url, json=chat(BROKEN), timeout=30)
    assert broken.status_code == 500 and "forward failed" not in broken.text
    with httpx.stream("POST", url, json=chat(BROKEN_MID_STREAM, stream=True), timeout=30) as response:
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200 and '"code":500' in events[-2] and events[-1] == "data: [DONE]"
    good = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0)

    counted = wait_for_outcomes(server, before, 20 + 5 + 2 + 1)
    assert counted == {"success": 1, "cancelled": 20, "client_error": 5, "server_error": 2}
    deadline = time.monotonic() + 30
    while engine.stats()["running"] + engine.stats()["waiting"] and time.monotonic() < deadline:
        time.sleep(0.05)
    after, engine_after = scrape(server), engine.stats()
    prompt = after[("gmaivl:prompt_tokens_total", ())] - before[("gmaivl:prompt_tokens_total", ())]
    generated = after[("gmaivl:generation_tokens_total", ())] - before[("gmaivl:generation_tokens_total", ())]
    # every request that reached the engine (the 20 left, the two broken, the good one) and no other
    assert prompt == engine_after["prompt_tokens"] - engine_before["prompt_tokens"]
    assert prompt > 21 * good.usage.prompt_tokens  # the 20 left and the good one ask alike; the broken two too
    # each cancelled stream had a token when it was left; the engine may have made one more before it stopped
    assert 20 + 2 + good.usage.completion_tokens <= generated
    assert generated <= engine_after["generated_tokens"] - engine_before["generated_tokens"]
    assert moved_count(before, after, "gmaivl:request_queue_time_seconds_count") == 23


def moved_count(before, after, name) -> float:
    return after.get((name, ()), 0.0) - before.get((name, ()), 0.0)


def test_an_answer_records_its_latencies_and_image_decode_time(server, folder):
    """A success with an image: image decode time, queue time, time per output token (one sample, equal to the
    inter-token latency's mean for that request), TTFT and end-to-end each move by one.
    Mutants: the decode time not observed (its count stays); `time_per_output_token` not observed."""
    from train_fixtures import make_image

    path = folder.parent / "metrics_red.png"
    make_image(path, "red", size=(48, 40))
    url = data_uri(open(path, "rb").read(), "image/png")
    before = scrape(server)
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", max_retries=0)
    reply = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": QUESTION}]}])
    assert reply.usage.completion_tokens >= 2
    after = wait_for_scrape(server, before, "gmaivl:requests_total", (("outcome", "success"),))
    for name in ("image_decode_seconds", "request_queue_time_seconds", "time_per_output_token_seconds",
                 "time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert moved_count(before, after, f"gmaivl:{name}_count") == 1, name
    assert moved_count(before, after, "gmaivl:image_decode_seconds_sum") > 0
    tpot = moved_count(before, after, "gmaivl:time_per_output_token_seconds_sum")
    itl = moved_count(before, after, "gmaivl:inter_token_latency_seconds_sum") / (reply.usage.completion_tokens - 1)
    assert tpot == pytest.approx(itl, rel=1e-6) and tpot > 0


def wait_for_scrape(server, before, name, labels, timeout=30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        after = scrape(server)
        if after.get((name, labels), 0) > before.get((name, labels), 0) or time.monotonic() > deadline:
            return after
        time.sleep(0.05)

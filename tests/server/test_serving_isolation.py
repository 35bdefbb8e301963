"""Over HTTP, one request never harms another: a poison sampling request among live streams (the official `openai`
client), and a burst against `--max-waiting` (httpx). Real servers on free loopback ports."""
from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from engine_steps import slow_steps

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from PIL import Image  # noqa: E402
from server_fixtures import TEXTS, data_uri  # noqa: E402

from gmaivl_rt import Engine  # noqa: E402
from gmaivl_rt.server import create_app  # noqa: E402
from gmaivl_rt.server.background import BackgroundServer  # noqa: E402

MODEL = "tiny-isolation"
LIVE = ["This is a CT scan of the chest.", "Describe the image.", "What modality is this image?", "An axial slice."]
LIVE_TOKENS = 32


@pytest.fixture(scope="module")
def folder(tiny_model_folder):
    return tiny_model_folder(TEXTS, "serving_isolation")


@pytest.mark.parametrize("temperature", [1e-300, 1e-45])
def test_a_poison_temperature_among_live_streams_harms_none(folder, temperature):
    """The report's poison (`temperature` 1e-300 or 1e-45) sent while 4 streams are mid-answer: all 200, the
    streams equal their answers alone, the poison's answer is the greedy one (the limit of a temperature -> 0).
    Mutant: `fp32_divisor` returning its argument: the poison gets a 500 and the 4 streams end with an error."""
    with Engine(folder, max_batch_size=8) as engine:
        with BackgroundServer(create_app(engine, served_model_name=MODEL)) as server:
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="-", timeout=60, max_retries=0)

            def ask(question, max_tokens, **fields):
                return client.chat.completions.create(model=MODEL, max_tokens=max_tokens, messages=[
                    {"role": "user", "content": question}], **fields)

            replies = {q: ask(q, LIVE_TOKENS, temperature=0) for q in LIVE}
            assert all(r.usage.completion_tokens == LIVE_TOKENS for r in replies.values())  # long enough to overlap
            alone = {q: r.choices[0].message.content for q, r in replies.items()}
            greedy = ask("Hi", 4, temperature=0).choices[0].message.content
            slow_steps(engine, 0.03)  # the live streams stay mid-answer (over a second) while the poison runs
            started, results, errors = threading.Barrier(len(LIVE) + 1), {}, []

            def stream(question):
                try:
                    parts, first = [], True
                    for chunk in ask(question, LIVE_TOKENS, temperature=0, stream=True):
                        if chunk.choices and chunk.choices[0].delta.content:
                            parts.append(chunk.choices[0].delta.content)
                            if first:
                                first = False
                                started.wait(30)
                    results[question] = ("".join(parts), time.monotonic())
                except BaseException as error:  # noqa: BLE001 - reported below
                    errors.append(error)

            threads = [threading.Thread(target=stream, args=(q,)) for q in LIVE]
            for t in threads:
                t.start()
            started.wait(30)  # every stream has its first token
            poison = ask("Hi", 4, temperature=temperature)
            poison_done = time.monotonic()
            for t in threads:
                t.join(60)
    assert not errors, errors
    assert poison.choices[0].message.content == greedy
    assert {q: text for q, (text, _) in results.items()} == alone
    assert all(end >= poison_done for _, end in results.values()), "the poison did not overlap the live streams"


def _png(seed: int) -> bytes:
    """A 512x512 noise PNG (decoding it takes a moment, as the report's burst of image requests did)."""
    pixels = (np.random.RandomState(seed).rand(512, 512, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_burst_cannot_pass_max_waiting(folder):
    """12 simultaneous image requests with --max-waiting 4 and --max-batch-size 2: some get 429 (vLLM's error shape),
    the rest 200, and the engine's waiting count sampled throughout never goes above 4.
    Mutant: the waiting count read before the images are decoded, without counting the requests being decoded (the
    old check): all 12 pass and waiting goes above 4."""
    images = [data_uri(_png(i), "image/png") for i in range(12)]
    with Engine(folder, max_batch_size=2) as engine:
        with BackgroundServer(create_app(engine, served_model_name=MODEL, max_waiting=4)) as server:
            peak, stop = [0], threading.Event()

            def sample():
                while not stop.is_set():
                    peak[0] = max(peak[0], engine.stats()["waiting"])
                    time.sleep(0.0005)

            gate, statuses = threading.Barrier(12), []

            def post(url):
                body = {"model": MODEL, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": [
                    {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "Describe the image."}]}]}
                gate.wait(30)
                response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=120)
                statuses.append((response.status_code, response.json()))

            sampler = threading.Thread(target=sample)
            sampler.start()
            threads = [threading.Thread(target=post, args=(u,)) for u in images]
            for t in threads:
                t.start()
            for t in threads:
                t.join(180)
            stop.set()
            sampler.join()
    codes = sorted(code for code, _ in statuses)
    assert len(codes) == 12 and set(codes) <= {200, 429}, codes
    assert 4 <= codes.count(200) < 12, codes
    assert all(body["error"]["type"] == "TooManyRequests" for code, body in statuses if code == 429)
    assert peak[0] <= 4, f"waiting reached {peak[0]}"

"""`make soak`: a bounded soak of `gmaivl-rt serve` (issue 25), not part of CI.

Mixed chat requests at a steady rate for SOAK_MINUTES (default 20) against the real CLI server on a free 127.0.0.1
port (a tiny model built in a temporary folder): text and image requests of several sizes (PNG 32..2048 px, a CT
DICOM), streamed and not, streams left after their first token, clients that give up before the answer, and bad
input (invalid JSON, unknown or mistyped fields, undecodable images, a request over the pixel budget, a body over
the byte limit, n=2, seed 2**64); the page, /health and /metrics are fetched along the way. It stops by itself and
exits 0 only if:

* no answer had a 5xx status (nor a stream an error event), and `gmaivl:requests_total{outcome="server_error"}` is 0;
* every chat request sent is accounted in /metrics: the outcomes add up to the requests sent, `client_error` equals
  the 4xx answers the clients saw, and `success` + `cancelled` equal the requests answered 200 (at least every answer
  read to its end is a success);
* the server's resident memory at the end is within SOAK_RSS_GROWTH (default 5%) of its level after the warm-up;
* the least-squares line through the RSS samples of the last SOAK_TREND_WINDOW_S seconds (default 900, none before
  the warm-up's end) rises by less than SOAK_RSS_TREND (default 0.25%) of that level a minute: a leak shows as a
  steady rise, whatever step came before.

The warm-up, before the baseline is read: every kind of request and each of its variants (every image size, each
bad body, streams with and without an image, ...), SOAK_CLIENTS at once, then SOAK_WARMUP_S seconds (default 60) of
the mix. Why: memory the server takes once and keeps (measured: the 2048 px 16-bit PNG decoded in several threads
at once leaves up to +215 MiB in glibc's per-thread malloc arenas, a plateau reached after 4 at once; it came back
with MALLOC_ARENA_MAX=1) would otherwise show as growth whenever the random mix first sends such requests together
(the 2026-12-07 soak: a +77 MiB step in its second minute, then flat for 18 minutes).

Knobs: SOAK_MINUTES, SOAK_RATE (requests per second, default 3), SOAK_CLIENTS (threads, default 16), SOAK_SEED,
SOAK_WARMUP_S, SOAK_RSS_GROWTH, SOAK_RSS_TREND, SOAK_TREND_WINDOW_S, SOAK_LEAK_KIB (a deliberate leak, above).
Prints one JSON summary line at the end.
"""
from __future__ import annotations

import base64
import collections
import io
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "support"))
from measure import serving  # noqa: E402
from server_fixtures import TEXTS  # noqa: E402
from train_fixtures import make_tiny_chat_model  # noqa: E402

from gmaivl_rt.server.background import free_port  # noqa: E402

MINUTES = float(os.environ.get("SOAK_MINUTES", "20"))
RATE = float(os.environ.get("SOAK_RATE", "3"))
CLIENTS = int(os.environ.get("SOAK_CLIENTS", "16"))
WARMUP_S = float(os.environ.get("SOAK_WARMUP_S", "60"))
RSS_GROWTH = float(os.environ.get("SOAK_RSS_GROWTH", "0.05"))
# the fitted RSS line's slope may rise by at most this share of the baseline a minute (5 % over 20 minutes)
RSS_TREND = float(os.environ.get("SOAK_RSS_TREND", "0.0025"))
TREND_WINDOW_S = float(os.environ.get("SOAK_TREND_WINDOW_S", "900"))
SEED = int(os.environ.get("SOAK_SEED", "0"))
# A deliberate leak, to show the checks catch one: the server (started through `leaky_serve`, in this file only)
# keeps SOAK_LEAK_KIB KiB for every HTTP request it answers. 0: the real server.
LEAK_KIB = int(os.environ.get("SOAK_LEAK_KIB", "0"))
MAX_REQUEST_BYTES = 2 << 20
MAX_REQUEST_PIXELS = 20_000_000
QUESTIONS = ["What modality is this image?", "Which plane is shown?", "Describe the image."]


def data_uri(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode('ascii')}"


def png(side: int, seed: int, sixteen_bit: bool = False) -> bytes:
    rng = np.random.RandomState(seed)
    if sixteen_bit:
        array = (np.add.outer(np.arange(side), np.arange(side)) * 7 % 4096).astype(np.uint16)
    else:
        array = (rng.rand(side, side, 3) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class Tally:
    """What the clients saw, by kind of request and by class of answer."""

    def __init__(self):
        self.lock = threading.Lock()
        self.sent = 0
        self.classes = collections.Counter()  # ok_read (200 read to the end), ok_left (200, left midway), 4xx, 5xx
        self.kinds = collections.Counter()
        self.failures: list[str] = []  # anything that breaks a rule, with what was seen

    def add(self, kind: str, answer_class: str, detail: str = ""):
        with self.lock:
            self.kinds[kind] += 1
            self.classes[answer_class] += 1
            if answer_class == "5xx" or answer_class == "unexpected":
                self.failures.append(f"{kind}: {detail[:300]}")


def chat(question: str, images=(), **fields) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    content = [*parts, {"type": "text", "text": question}] if parts else question
    return {"model": "soak", "max_tokens": 16, "temperature": 0, "messages": [{"role": "user", "content": content}],
            **fields}


def build_requests(rng: random.Random):
    """Request makers: name -> (weight, function(client, variant=None) -> (answer class, detail), variants). A
    variant (an image's name, a bad body's name, ...) picks what is otherwise drawn at random: the warm-up sends
    each one."""
    from pydicom.data import get_testdata_file

    images = {f"png{side}": data_uri(png(side, side), "image/png") for side in (32, 256)}  # colour noise
    images.update({f"png{side}x16bit": data_uri(png(side, 0, sixteen_bit=True), "image/png") for side in (1024, 2048)})
    images["ct"] = data_uri(Path(get_testdata_file("CT_small.dcm")).read_bytes(), "application/dicom")
    over_budget = data_uri(png(5000, 0, sixteen_bit=True), "image/png")  # 25 M pixel values > 20 M per request
    truncated = png(256, 1)[:300]

    def post(client, body=None, raw=None, timeout=120):
        if raw is not None:
            return client.post("/v1/chat/completions", content=raw, timeout=timeout,
                               headers={"Content-Type": "application/json"})
        return client.post("/v1/chat/completions", json=body, timeout=timeout)

    def classify(response, kind, expect_4xx=False) -> str:
        code = response.status_code
        if code >= 500:
            return "5xx"
        if 400 <= code < 500:
            return "4xx" if expect_4xx or code == 429 else "unexpected"
        return "unexpected" if expect_4xx else "ok_read"

    def text(client, max_tokens=None):
        r = post(client, chat(rng.choice(QUESTIONS), max_tokens=max_tokens or rng.choice([4, 16, 32])))
        return classify(r, "text"), r.text

    def image(client, name=None):
        name = name or rng.choice(sorted(images))
        r = post(client, chat(rng.choice(QUESTIONS), [images[name]]))
        return classify(r, "image"), r.text

    def stream(client, with_image=None, leave_early=False):
        with_image = rng.random() < 0.5 if with_image is None else with_image == "image"
        body = chat(rng.choice(QUESTIONS), [images["png256"]] if with_image else (), stream=True,
                    max_tokens=48 if leave_early else 16)
        with client.stream("POST", "/v1/chat/completions", json=body, timeout=120) as response:
            if response.status_code != 200:
                return classify(response, "stream"), response.read().decode(errors="replace")
            lines = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    lines.append(line)
                    if '"error"' in line:
                        return "5xx" if '"code": 5' in line or '"code":5' in line else "4xx", line
                    if leave_early and '"content"' in line:
                        return "ok_left", ""  # closing the response disconnects
            return ("ok_read", "") if lines and lines[-1] == "data: [DONE]" else ("unexpected", str(lines[-3:]))

    def left_stream(client, with_image=None):
        return stream(client, with_image, leave_early=True)

    def impatient(client, variant=None):
        try:
            r = post(client, chat(rng.choice(QUESTIONS), [images["png256"]], max_tokens=64),
                     timeout=httpx.Timeout(30, read=0.3))  # the body is sent whole, the answer not waited for
        except httpx.TimeoutException:
            return "ok_left", ""  # the client gave up: the server may still have answered 200 (a success) or not
        return classify(r, "impatient"), r.text

    bad_bodies = {
        "invalid json": dict(raw=b'{"messages": [}'),
        "unknown field": dict(body={**chat("Hi"), "temprature": 0.5}),
        "mistyped field": dict(body={**chat("Hi"), "max_tokens": "4"}),
        "n=2": dict(body={**chat("Hi"), "n": 2}),
        "huge seed": dict(body={**chat("Hi"), "seed": 2**64}),
        "bad base64": dict(body=chat("Hi", ["data:image/png;base64,@@@@"])),
        "truncated png": dict(body=chat("Hi", [data_uri(truncated, "image/png")])),
        "over pixel budget": dict(body=chat("Hi", [over_budget])),
        "over byte limit": dict(raw=json.dumps(chat("Hi", ["data:image/png;base64," + "A" * MAX_REQUEST_BYTES]))
                                .encode()),  # refused from Content-Length
    }

    def bad(client, name=None):
        name = name or rng.choice(sorted(bad_bodies))
        r = post(client, **bad_bodies[name])
        return classify(r, "bad", expect_4xx=True), f"{name}: {r.status_code} {r.text[:200]}"

    def pages(client, variant=None):  # not chat requests: not counted in the outcomes
        for path in ("/", "/static/app.js", "/health", "/metrics"):
            r = client.get(path, timeout=60)
            if r.status_code != 200:
                return "unexpected", f"{path}: {r.status_code}"
        return None, ""

    with_or_without = ["image", "text"]
    return {"text": (4, text, [32]), "image": (4, image, sorted(images)), "stream": (3, stream, with_or_without),
            "left_stream": (2, left_stream, with_or_without), "impatient": (1, impatient, [None]),
            "bad": (3, bad, sorted(bad_bodies)), "pages": (1, pages, [None])}


def rss_trend(samples: list, baseline_t: float | None, baseline: float | None) -> dict | None:
    """The least-squares line through the RSS samples [(seconds, MiB)] of the trend window (the last TREND_WINDOW_S
    seconds, none before the baseline): its slope as a share of the baseline per minute, and the window. A leak
    grows RSS steadily and shows here even where a step after the warm-up would hide it from, or add to, the
    end-over-baseline figure. None without a baseline or with fewer than 4 samples."""
    if baseline is None:
        return None
    end = samples[-1][0]
    window = [(t, r) for t, r in samples if t >= max(baseline_t, end - TREND_WINDOW_S)]
    if len(window) < 4:
        return None
    times, rss = np.array([t for t, _ in window]) / 60, np.array([r for _, r in window])
    slope = float(np.polyfit(times, rss, 1)[0])  # MiB a minute
    return {"per_minute": slope / baseline, "mib_per_minute": round(slope, 3),
            "window_s": [window[0][0], window[-1][0]], "samples": len(window)}


def scrape_outcomes(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=60).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^gmaivl:requests_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


def main() -> int:
    rng = random.Random(SEED)
    with tempfile.TemporaryDirectory(prefix="gmaivl-soak-") as tmp:
        folder = make_tiny_chat_model(Path(tmp), TEXTS)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        command = [sys.executable, __file__, "--leaky-serve", str(LEAK_KIB)] if LEAK_KIB else \
            [sys.executable, "-m", "gmaivl_rt.cli"]
        server = subprocess.Popen([*command, "serve", str(folder), "--port", str(port),
                                   "--served-model-name", "soak", "--max-batch-size", "8", "--max-waiting", "32",
                                   "--max-request-bytes", str(MAX_REQUEST_BYTES),
                                   "--max-request-pixels", str(MAX_REQUEST_PIXELS)],
                                  stdout=subprocess.DEVNULL, stderr=open(Path(tmp) / "server.log", "w"))
        try:
            return soak(url, server, rng, Path(tmp) / "server.log")
        finally:
            server.terminate()
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()


def soak(url: str, server: subprocess.Popen, rng: random.Random, server_log: Path) -> int:
    if not serving(url, server):
        print("soak: the server did not start:\n" + server_log.read_text()[-3000:], file=sys.stderr)
        return 1

    makers = build_requests(rng)
    names = sorted(makers)
    weights = [makers[n][0] for n in names]
    tally, local = Tally(), threading.local()

    def one(kind: str, variant=None):
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(base_url=url)
        counted = kind != "pages"
        if counted:
            with tally.lock:
                tally.sent += 1
        idle_s = time.monotonic() - getattr(local, "last_end", time.monotonic())
        try:
            answer_class, detail = makers[kind][1](client, variant)
        except httpx.TransportError as error:  # a connection the server broke
            # how long this client's connections had been idle: a keep-alive race shows as idle ~ the server's
            # keep-alive timeout (--timeout-keep-alive)
            answer_class, detail = "unexpected", f"{type(error).__name__}: {error} (client idle {idle_s:.2f} s)"
        local.last_end = time.monotonic()
        if answer_class is not None:
            tally.add(kind, answer_class, detail)

    total_s = MINUTES * 60
    pending = collections.deque()
    with ThreadPoolExecutor(max_workers=CLIENTS, thread_name_prefix="soak-client") as pool:
        warm_up_started, rss_before = time.monotonic(), rss_mib(server.pid)
        # Warm-up, part 1: every kind of request, each variant (every image size, each bad body, streams with and
        # without an image), CLIENTS at once: whatever memory the server takes once for good (a thread pool grown
        # to its most, each of its threads' malloc arena, the largest image's buffers) is taken before the baseline.
        for kind in names:
            for variant in makers[kind][2]:
                for future in [pool.submit(one, kind, variant) for _ in range(CLIENTS)]:
                    future.result()
        bursts = {"seconds": round(time.monotonic() - warm_up_started, 1), "rss_before_mib": round(rss_before),
                  "rss_after_mib": round(rss_mib(server.pid)), "requests": tally.sent}
        print(f"soak: every request kind sent {CLIENTS} at once: {bursts}", file=sys.stderr, flush=True)
        # part 2: the mix itself for WARMUP_S seconds; the baseline is read then
        started = time.monotonic()
        samples, baseline, baseline_t, backlog_peak = [], None, None, 0
        n = 0
        next_sample = started
        while (now := time.monotonic()) < started + total_s:
            if now >= next_sample:
                samples.append((round(now - started, 1), rss_mib(server.pid)))
                next_sample += 5
                if baseline is None and now - started >= min(WARMUP_S, total_s / 3):
                    baseline, baseline_t = samples[-1][1], samples[-1][0]
                    print(f"soak: warm-up done, RSS {baseline:.1f} MiB", file=sys.stderr, flush=True)
            due = started + n / RATE
            if now < due:
                time.sleep(min(due - now, 0.5))
                continue
            pending.append(pool.submit(one, rng.choices(names, weights)[0]))
            n += 1
            while pending and pending[0].done():
                pending.popleft().result()
            backlog_peak = max(backlog_peak, len(pending))
            if server.poll() is not None:
                tally.failures.append(f"the server exited with code {server.returncode}")
                break
        for future in pending:
            future.result()
    elapsed = time.monotonic() - started

    # settle: every request ended (the metrics record a stream's outcome when the server notices it ended)
    time.sleep(3)
    outcomes = scrape_outcomes(url)
    for _ in range(30):
        if sum(outcomes.values()) >= tally.sent:
            break
        time.sleep(1)
        outcomes = scrape_outcomes(url)
    final_rss = rss_mib(server.pid)
    growth = (final_rss - baseline) / baseline if baseline else float("nan")
    trend = rss_trend(samples, baseline_t, baseline)
    answered_200 = tally.classes["ok_read"] + tally.classes["ok_left"]
    checks = {
        "no 5xx seen": tally.classes["5xx"] == 0,
        "no unexpected answer": tally.classes["unexpected"] == 0,
        "server_error outcome 0": outcomes.get("server_error", 0) == 0,
        "every request counted": sum(outcomes.values()) == tally.sent,
        "client_error == 4xx seen": outcomes.get("client_error", 0) == tally.classes["4xx"],
        "success + cancelled == 200s": outcomes.get("success", 0) + outcomes.get("cancelled", 0) == answered_200,
        "answers read to the end are successes": outcomes.get("success", 0) >= tally.classes["ok_read"],
        f"RSS growth under {RSS_GROWTH:.0%}": baseline is not None and growth < RSS_GROWTH,
        f"RSS trend under {RSS_TREND:.2%} a minute": trend is not None and trend["per_minute"] < RSS_TREND,
    }
    summary = {"minutes": round(elapsed / 60, 2), "rate_per_s": RATE, "sent": tally.sent,
               "kinds": dict(tally.kinds), "answers": dict(tally.classes), "metrics_outcomes": outcomes,
               "rss_after_warmup_mib": baseline, "rss_final_mib": final_rss, "rss_max_mib": max(r for _, r in samples),
               "rss_growth": growth, "rss_trend": trend, "warm_up_bursts": bursts,
               "rss_every_30s_mib": [round(r) for t, r in samples if t % 30 < 5],
               "client_backlog_peak": backlog_peak, "checks": checks,
               "failures": tally.failures[:20]}
    print(json.dumps(summary))
    return 0 if all(checks.values()) and not tally.failures else 1


def leaky_serve(kib: int, argv: list[str]) -> int:
    """`gmaivl-rt ARGV` with an app that keeps `kib` KiB (written, so resident) for every HTTP request: a leak of the
    kind the soak's RSS checks must catch (SOAK_LEAK_KIB)."""
    import gmaivl_rt.server.app as app_module
    from gmaivl_rt.cli import main as cli_main

    create_app, kept = app_module.create_app, []

    def leaking_app(*args, **kwargs):
        app = create_app(*args, **kwargs)

        @app.middleware("http")
        async def keep(request, call_next):
            kept.append(b"\x01" * (kib * 1024))
            return await call_next(request)

        return app

    app_module.create_app = leaking_app  # `serve` imports it when it runs
    return cli_main(argv)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--leaky-serve"]:
        sys.exit(leaky_serve(int(sys.argv[2]), sys.argv[3:]))
    sys.exit(main())

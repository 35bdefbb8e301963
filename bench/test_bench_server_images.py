"""Image admission control under the report's load (issue 25 item 5), against the real `gmaivl-rt serve` process.

1. Four concurrent requests of eight 16-bit 7000x7000 PNGs (each under the 50 MP per-image limit, 0.9 MB in all):
   with the default budget each is refused with 413 from the headers; with a budget raised to admit one such request
   (`--max-request-pixels 400000000 --max-server-pixels 400000000`) one is served and the others get 429 with
   Retry-After; clients that retry are all served in turn. Reported: each refusal's latency (goal: under 1 s), the
   server's peak RSS above idle against the bound documented in `gmaivl_rt.limits.DecodeBudget`, and RSS after.
2. A separate process probes `GET /` and `/health` on the same server idle, then while 64 streams run (64 clients,
   each starting its next stream as its last one ends): p50/p99
   latency of each (goal: p99 under 100 ms under the streams), the longest gap between two events of a stream,
   the load average (GMAIVL_BENCH_PROBE_S, default 20 s, per probe).

Numbers are printed and kept in extra_info; what is asserted is what must hold on any machine: the refusals' status
codes and Retry-After, every retried request served, the streams all ending with [DONE], no probe failing.
Bounded: GMAIVL_BENCH_STREAMS (default 64) streams of GMAIVL_BENCH_STREAM_TOKENS (default 200) tokens; servers on
127.0.0.1, free ports, stopped after. GMAIVL_BENCH_SERVE_PACKAGE=DIR serves another version to compare with the
same clients: DIR holds only its `gmaivl_rt` package, links resolved (`git archive COMMIT | tar -x -C old; cp -rL
old/gmaivl_rt DIR/`; a checkout root would shadow installed packages with its bare kernels/ train/ export/).
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from measure import serving  # noqa: E402
from PIL import Image  # noqa: E402
from server_fixtures import TEXTS, data_uri  # noqa: E402
from train_fixtures import make_tiny_chat_model  # noqa: E402

from gmaivl_rt.limits import DecodeBudget, Limits  # noqa: E402
from gmaivl_rt.server.background import free_port  # noqa: E402

STREAMS = int(os.environ.get("GMAIVL_BENCH_STREAMS", "64"))
STREAM_TOKENS = int(os.environ.get("GMAIVL_BENCH_STREAM_TOKENS", "200"))
SIDE, PER_REQUEST, CONCURRENT = 7000, 8, 4
RAISED = 400_000_000


def _status(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":")) / 1024


def _reset_peak(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


class Served:
    """`gmaivl-rt serve FOLDER ARGS` on a free loopback port, until `stop()`."""

    def __init__(self, folder, *args):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env, other = dict(os.environ), os.environ.get("GMAIVL_BENCH_SERVE_PACKAGE")
        if other:  # another version's server (a folder holding its gmaivl_rt package), measured by the same clients
            env["PYTHONPATH"] = other
        self.process = subprocess.Popen([sys.executable, "-m", "gmaivl_rt.cli", "serve", str(folder), "--port",
                                         str(self.port), *map(str, args)], env=env, cwd=other or None,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not serving(self.url, self.process):
            self.stop()
            pytest.fail("gmaivl-rt serve did not come up")

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_chat_model(tmp_path_factory.mktemp("bench_images"), TEXTS)


@pytest.fixture(scope="module")
def big_request():
    ramp = (np.add.outer(np.arange(SIDE), np.arange(SIDE)) * 4).astype(np.uint16)  # a smooth 16-bit ramp
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    url = data_uri(buffer.getvalue(), "image/png")
    parts = [{"type": "image_url", "image_url": {"url": url}} for _ in range(PER_REQUEST)]
    return {"max_tokens": 4, "temperature": 0,
            "messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "Describe the image."}]}]}


def _warm_up(url: str) -> None:
    """One small image request: the server's first-use work (imports, allocations) is not what is measured."""
    ramp = (np.arange(64 * 64).reshape(64, 64) % 256).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    response = httpx.post(url + "/v1/chat/completions", timeout=120, json={"max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_uri(buffer.getvalue(),
                                                                                          "image/png")}},
                                     {"type": "text", "text": "Describe the image."}]}]})
    assert response.status_code == 200, response.text


def _concurrent(url: str, body: dict, retry: bool) -> list[dict]:
    """CONCURRENT clients posting `body` at once: [{status, seconds, retry_after, attempts}] per client (the last
    attempt's status; with `retry`, a 429 is retried after its Retry-After until served, within 15 minutes)."""
    gate, results = threading.Barrier(CONCURRENT), []
    # encoded once, and each client's connection made before the gate: what is timed is the server's answer, not
    # the client encoding 4 MB of JSON or building its SSL context (all four contend for this process's GIL)
    content = json.dumps(body).encode()

    def client():
        with httpx.Client(timeout=900, headers={"Content-Type": "application/json"}) as http:
            http.get(url + "/health")
            gate.wait(60)
            attempts, deadline = [], time.monotonic() + 900
            while True:
                start = time.perf_counter()
                response = http.post(url + "/v1/chat/completions", content=content)
                attempts.append({"status": response.status_code, "seconds": time.perf_counter() - start,
                                 "retry_after": response.headers.get("retry-after")})
                if not (retry and response.status_code == 429 and time.monotonic() < deadline):
                    break
                time.sleep(float(response.headers.get("retry-after") or 1))
        results.append({**attempts[-1], "attempts": attempts})

    threads = [threading.Thread(target=client) for _ in range(CONCURRENT)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1000)
    return results


def _memory_bound_mib(budget: DecodeBudget) -> float:
    """The bound `DecodeBudget` documents: decode_workers x 40 B x the largest picture + 3 B x max_server_pixels."""
    largest = min(SIDE * SIDE, Limits().max_image_pixels)
    return (budget.decode_workers * 40 * largest + 3 * budget.max_server_pixels) / 2**20


def test_the_reports_requests_are_refused_from_their_headers(folder, big_request, benchmark):
    """The default budget: each of the four concurrent requests gets a 413. For scale, the same server's answer to
    four concurrent one-line bad requests (`n=2`, a 400 before any image is read) is measured alongside: the ratio
    is what the 1 s goal means on a machine whose load varies."""
    report = {"request body MB": len(json.dumps(big_request)) / 1e6}
    plain = {"n": 2, "messages": [{"role": "user", "content": "Hi"}]}

    def run():
        served = Served(folder)  # the default budget
        try:
            _warm_up(served.url)
            _reset_peak(served.pid)
            idle = _status(served.pid, "VmRSS")
            report["load average before"] = os.getloadavg()
            for round_ in range(3):  # alternated, so the machine's load falls on both alike
                results = _concurrent(served.url, big_request, retry=False)
                baseline = _concurrent(served.url, plain, retry=False)
                report.setdefault("statuses", []).extend(r["status"] for r in results)
                report.setdefault("plain statuses", []).extend(r["status"] for r in baseline)
                report.setdefault("slowest refusal s", []).append(max(r["seconds"] for r in results))
                report.setdefault("slowest plain 400 s", []).append(max(r["seconds"] for r in baseline))
            report["peak RSS above idle MiB"] = _status(served.pid, "VmHWM") - idle
            report["load average after"] = os.getloadavg()
        finally:
            served.stop()

    benchmark.pedantic(run, rounds=1, iterations=1)
    report["refusal / plain 400"] = sorted(report["slowest refusal s"])[1] / sorted(report["slowest plain 400 s"])[1]
    benchmark.extra_info.update({k: v for k, v in report.items() if not isinstance(v, (list, tuple))})
    print("\nlarge image requests, default budget: " + json.dumps(report, default=str))
    assert set(report["statuses"]) == {413} and set(report["plain statuses"]) == {400}


def test_a_raised_budget_serves_one_at_a_time_within_the_memory_bound(folder, big_request, benchmark):
    """`--max-request-pixels` and `--max-server-pixels` raised to admit one such request: one is served, the
    others get 429 with Retry-After; clients that retry are all served in turn. Peak RSS above idle against the
    documented bound, and RSS after (memory handed back)."""
    report = {}

    def run():
        budget = DecodeBudget(max_request_pixels=RAISED, max_server_pixels=RAISED)
        served = Served(folder, "--max-request-pixels", RAISED, "--max-server-pixels", RAISED)
        try:
            _warm_up(served.url)
            peak_known = _reset_peak(served.pid)
            idle = _status(served.pid, "VmRSS")
            first = _concurrent(served.url, big_request, retry=False)
            report["raised: statuses"] = sorted(r["status"] for r in first)
            refusals = [r for r in first if r["status"] == 429]
            report["raised: slowest 429 s"] = max((r["seconds"] for r in refusals), default=float("nan"))
            report["raised: served request s"] = max((r["seconds"] for r in first if r["status"] == 200),
                                                     default=float("nan"))
            report["raised: retry-after"] = sorted({r["retry_after"] for r in refusals})
            retried = _concurrent(served.url, big_request, retry=True)
            report["retried: statuses"] = sorted(r["status"] for r in retried)
            report["retried: attempts"] = sum(len(r["attempts"]) for r in retried)
            report["retried: all served s"] = max(sum(a["seconds"] for a in r["attempts"]) for r in retried)
            report["raised: peak RSS above idle MiB"] = _status(served.pid, "VmHWM") - idle if peak_known else None
            report["raised: documented bound MiB"] = _memory_bound_mib(budget)
            time.sleep(2)
            report["raised: RSS above idle after MiB"] = _status(served.pid, "VmRSS") - idle
        finally:
            served.stop()

    benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update({k: v for k, v in report.items() if not isinstance(v, list)})
    print("\nlarge image requests, raised budget: " + json.dumps(report, default=str))
    assert report["raised: statuses"].count(200) >= 1 and set(report["raised: statuses"]) <= {200, 429}
    assert report["raised: retry-after"] in ([], ["1"])
    assert report["retried: statuses"] == [200] * CONCURRENT


PROBE = r"""
import json, sys, time, httpx
url, seconds = sys.argv[1], float(sys.argv[2])
times, failures = {"/": [], "/health": []}, 0
with httpx.Client(base_url=url, timeout=30) as client:
    stop = time.monotonic() + seconds
    while time.monotonic() < stop:
        for path in times:
            start = time.perf_counter()
            try:
                ok = client.get(path).status_code == 200
            except httpx.HTTPError:
                ok = False
            times[path].append(time.perf_counter() - start)
            failures += not ok
        time.sleep(0.02)
print(json.dumps({"times": times, "failures": failures}))
"""
PROBE_S = float(os.environ.get("GMAIVL_BENCH_PROBE_S", "20"))


def _probe(url: str) -> dict:
    """GET / and /health from a separate process for PROBE_S seconds: {"times": {path: [s, ...]}, "failures"}."""
    probe = subprocess.run([sys.executable, "-c", PROBE, url, str(PROBE_S)], capture_output=True, text=True,
                           timeout=300 + PROBE_S)
    return json.loads(probe.stdout)


def test_page_and_health_latency_while_64_streams_run(folder, benchmark):
    """Same server, same run: GET / and /health probed idle, then while STREAMS streams run: each of STREAMS
    clients starts a new stream as soon as its last one ends, until the probe is over (the tiny model's answers may
    end early, at its end-of-sequence token: the streams would otherwise thin out during the probe). p50 / p99 of
    each, the ratio of the p99s, the longest gap a stream saw between two events, and the load average around each
    part."""
    served = Served(folder, "--max-batch-size", 16)
    report = {}
    try:
        body = {"max_tokens": STREAM_TOKENS, "temperature": 0, "stream": True, "messages": [
            {"role": "user", "content": "Describe the image."}]}
        ended, errors, gaps = [], [], []
        probed = threading.Event()

        def stream():
            while not probed.is_set():  # one stream after another, so STREAMS run throughout the probe
                try:
                    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body,
                                      timeout=600) as response:
                        lines, stamps = [], []
                        for line in response.iter_lines():
                            if line.startswith("data: "):
                                lines.append(line)
                                stamps.append(time.monotonic())
                    ended.append(lines[-1] == "data: [DONE]" and response.status_code == 200)
                    gaps.append(max(b - a for a, b in zip(stamps, stamps[1:])) if len(stamps) > 1 else 0.0)
                except Exception as error:  # counted and reported
                    errors.append(type(error).__name__)
                    return

        def run():
            _warm_up(served.url)
            report["load before idle probe"] = os.getloadavg()
            idle = _probe(served.url)
            report["load before streams"] = os.getloadavg()
            threads = [threading.Thread(target=stream) for _ in range(STREAMS)]
            for t in threads:
                t.start()
            time.sleep(3)  # every stream connected and the engine busy
            loaded = _probe(served.url)
            probed.set()
            report["load after streamed probe"] = os.getloadavg()
            report["streams ended during the probe (each replaced)"] = len(ended)
            for t in threads:
                t.join(900)
            return idle, loaded

        idle, loaded = benchmark.pedantic(run, rounds=1, iterations=1)
        for side, probed in (("idle", idle), ("64 streams", loaded)):
            for path, times in probed["times"].items():
                report[f"{side}: {path} p50 ms"] = 1000 * _percentile(times, 0.5)
                report[f"{side}: {path} p99 ms"] = 1000 * _percentile(times, 0.99)
                report[f"{side}: {path} probes"] = len(times)
            report[f"{side}: probe failures"] = probed["failures"]
        for path in ("/", "/health"):
            report[f"{path} p99 streams / idle"] = report[f"64 streams: {path} p99 ms"] / report[f"idle: {path} p99 ms"]
        report["longest gap between stream events s"] = max(gaps, default=float("nan"))
        report["streams ended with [DONE]"] = sum(ended)
        report["streams"] = len(ended)
    finally:
        served.stop()
    benchmark.extra_info.update({k: v for k, v in report.items() if not isinstance(v, tuple)})
    print("\npage and /health, idle and under streams: " + json.dumps(report))
    assert not errors, errors
    assert report["streams ended with [DONE]"] == report["streams"] >= STREAMS
    assert report["idle: probe failures"] == 0 and report["64 streams: probe failures"] == 0

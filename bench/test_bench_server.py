"""Loopback load on `gmaivl-rt serve`: N streaming clients for a fixed time against the real CLI server process.

Reported (printed and in extra_info, not asserted): p50/p99 time to first token and end-to-end latency as the
client sees them, requests/s, generated tokens/s, and the server's resident memory after warm-up and after the
load (flat when nothing leaks per request or per image). Asserted: zero errors. Bounded: GMAIVL_BENCH_SERVER_S
seconds (default 20) and GMAIVL_BENCH_SERVER_CLIENTS clients (default 4), on 127.0.0.1, the server stopped after.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

# tests/support is on pytest's pythonpath (pyproject.toml)
from measure import serving  # noqa: E402
from server_fixtures import QUESTION, TEXTS, data_uri  # noqa: E402
from train_fixtures import make_tiny_chat_model  # noqa: E402

from gmaivl_rt.server.background import free_port  # noqa: E402

DURATION_S = float(os.environ.get("GMAIVL_BENCH_SERVER_S", "20"))
CLIENTS = int(os.environ.get("GMAIVL_BENCH_SERVER_CLIENTS", "4"))
MAX_TOKENS = 16


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))] if values else float("nan")


def _stream_once(url: str, body: dict) -> tuple[float, float, int]:
    """One streamed request: (seconds to the first content, seconds to [DONE], completion tokens)."""
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as response:
        if response.status_code != 200:
            raise RuntimeError(f"status {response.status_code}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                first = time.perf_counter()
    end = time.perf_counter()
    return (first or end) - start, end - start, tokens


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_tiny_chat_model(tmp_path_factory.mktemp("bench_serve"), TEXTS)
    port = free_port()
    # started outside the checkout root, where `python -m` would take its kernels/ train/ export/ for top-level
    # packages (docs/architecture.md)
    process = subprocess.Popen([sys.executable, "-m", "gmaivl_rt.cli", "serve", str(folder), "--port", str(port),
                                "--max-batch-size", str(max(CLIENTS, 1))], cwd=tmp_path_factory.mktemp("outside"),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        if not serving(url, process):
            pytest.fail("gmaivl-rt serve did not come up")
        yield url, process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()


def test_server_under_loopback_load(served, benchmark):
    from pydicom.data import get_testdata_file

    url, pid = served
    ct = get_testdata_file("CT_small.dcm")
    body = {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_uri(open(ct, "rb").read(), "application/dicom")}},
        {"type": "text", "text": QUESTION}]}],
        "max_tokens": MAX_TOKENS, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    for _ in range(3):  # warm-up: first-use allocations are not a leak
        _stream_once(url, body)
    rss_before = _rss_mib(pid)

    results, errors = [], []
    stop_at = time.monotonic() + DURATION_S

    def client():
        while time.monotonic() < stop_at:
            try:
                results.append(_stream_once(url, body))
            except Exception as e:  # counted and reported
                errors.append(type(e).__name__)

    def load():
        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(DURATION_S + 120)
        return time.perf_counter() - start

    elapsed = benchmark.pedantic(load, rounds=1, iterations=1)
    rss_after = _rss_mib(pid)
    ttft, e2e = [r[0] for r in results], [r[1] for r in results]
    report = {"clients": CLIENTS, "seconds": round(elapsed, 2), "requests": len(results), "errors": len(errors),
              "requests_per_s": len(results) / elapsed, "tokens_per_s": sum(r[2] for r in results) / elapsed,
              "ttft_p50_s": statistics.median(ttft) if ttft else float("nan"), "ttft_p99_s": _percentile(ttft, 0.99),
              "e2e_p50_s": statistics.median(e2e) if e2e else float("nan"), "e2e_p99_s": _percentile(e2e, 0.99),
              "rss_before_mib": rss_before, "rss_after_mib": rss_after, "rss_growth_mib": rss_after - rss_before}
    benchmark.extra_info.update(report)
    print("\nserver load: " + ", ".join(f"{k} {v:.3g}" if isinstance(v, float) else f"{k} {v}"
                                        for k, v in report.items()))
    assert not errors, f"{len(errors)} failed requests: {sorted(set(errors))}"
    assert results, "no request finished in the time given"

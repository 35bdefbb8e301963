"""Issue 30: the demo model answering in the browser (`gmaivl-rt export web`, headless Chromium, onnxruntime-web on
WebAssembly) beside `gmaivl-rt serve` (torch and onnx backends) on the same machine, same picture, same question.

    python bench/browser_vs_server.py --demo runs/demo [--tjs DIR] [--rounds 5] [--max-new-tokens 32]

--tjs: an existing `export onnx --layout transformers.js` folder of DEMO/stage3 (e.g. the one
bench/quantize_agreement.py writes); else one is exported (fp32 and q4, every threshold 0) into DEMO/browser_bench.
Each round asks the page (fp32, then q4) and each server once, in that order, after a 1 s idle gap, after one
warm-up ask of each. Reported per side: time to the first token and tokens/s after it (median and range over the
rounds), with the date and the load average.

What each side's clock covers: the page times `generate` (from the call to its streamer's first token, then the
rest), after it has read the picture; the server's is the client's: the request (the picture as a data URI)
to the first streamed content, then the rest. The page is served as plain static files (no cross-origin isolation
headers, so onnxruntime-web runs single-threaded, as it does from `python -m http.server`); the servers use the
machine's threads (torch's OpenMP pool; ONNX Runtime's, spinning off). Servers are started before the rounds and
stay up (idle) while the page answers. Needs Chromium + chromedriver (/usr/bin) and selenium, and `make js`. Not a test.
"""
from __future__ import annotations

import argparse
import base64
import datetime
import functools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from measure import serving  # bench/ is the script's own folder

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
QUESTION = "What part of the body is imaged?"


class _Quiet(SimpleHTTPRequestHandler):
    extensions_map = {**SimpleHTTPRequestHandler.extensions_map, ".mjs": "text/javascript", ".js": "text/javascript",
                      ".wasm": "application/wasm", ".json": "application/json"}

    def log_message(self, *args):
        pass


def _picture(demo: Path, out: Path) -> Path:
    """The first held-out scene's picture (DEMO/eval/heldout.tsv) as a PNG."""
    import io

    from PIL import Image

    from gmaivl_rt.eval.readers import Base64Image, read_benchmark

    image = read_benchmark(demo / "eval" / "heldout.tsv").items[0].images[0]
    path = out / "picture.png"
    source = io.BytesIO(base64.b64decode(image.data)) if isinstance(image, Base64Image) else image
    Image.open(source).convert("RGB").save(path)
    return path


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--no-first-run", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def _wait(predicate, seconds: float, what: str):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"timed out after {seconds} s waiting for {what}")


def _page_ask(driver, picture: Path, dtype: str) -> dict:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "dtype")).select_by_value(dtype)
    driver.find_element(By.ID, "image").send_keys(str(picture))
    question = driver.find_element(By.ID, "question")
    question.clear()
    question.send_keys(QUESTION)
    answer = driver.find_element(By.ID, "answer")
    driver.execute_script("arguments[0].removeAttribute('data-timing'); arguments[0].removeAttribute('data-error')",
                          answer)
    driver.find_element(By.ID, "ask").click()
    _wait(lambda: answer.get_attribute("data-timing") or answer.get_attribute("data-error"), 600, "the page's answer")
    if answer.get_attribute("data-error"):
        raise RuntimeError(answer.get_attribute("data-error"))
    timing = json.loads(answer.get_attribute("data-timing"))
    return {"ttft_s": timing["ttft_ms"] / 1000, "tokens_per_s": timing["tokens_per_s"], "tokens": timing["tokens"],
            "device": timing["device"]}


def _server_ask(url: str, picture: Path, max_new_tokens: int) -> dict:
    import httpx

    uri = "data:image/png;base64," + base64.b64encode(picture.read_bytes()).decode()
    body = {"model": "gmaivl", "stream": True, "temperature": 0, "max_tokens": max_new_tokens,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                                      {"type": "text", "text": QUESTION}]}]}
    start, first, tokens = time.perf_counter(), None, 0
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as response:
        if response.status_code != 200:
            raise RuntimeError(f"server status {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c["delta"].get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    first = first or end
    return {"ttft_s": first - start, "tokens_per_s": (tokens - 1) / (end - first) if tokens > 1 and end > first
            else 0.0, "tokens": tokens}


def _serve(model_dir: Path, work: Path, backend: str):
    from gmaivl_rt.server.background import free_port

    port = free_port()
    outside = work / "outside"  # not the checkout root, where `python -m` would pick top-level packages
    outside.mkdir(exist_ok=True)
    process = subprocess.Popen([sys.executable, "-m", "gmaivl_rt.cli", "serve", str(model_dir.resolve()), "--port",
                                str(port), "--served-model-name", "gmaivl", "--backend", backend], cwd=outside,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    if not serving(url, process, timeout=300):
        process.kill()
        raise RuntimeError("gmaivl-rt serve did not come up")
    return process, url


def _summary(rows: list[dict]) -> str:
    ttft = [r["ttft_s"] * 1000 for r in rows]
    rate = [r["tokens_per_s"] for r in rows]
    return (f"{statistics.median(ttft):.0f} ms ({min(ttft):.0f}-{max(ttft):.0f}) | {statistics.median(rate):.1f} "
            f"({min(rate):.1f}-{max(rate):.1f}) | {rows[0]['tokens']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", required=True, type=Path, help="a finished `gmaivl-rt demo --out` folder")
    parser.add_argument("--tjs", type=Path, default=None, help="its transformers.js export (else one is made)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--server-backends", default="torch,onnx",
                        help="gmaivl-rt serve --backend for each server side (onnx: `export onnx` of the model)")
    args = parser.parse_args(argv)
    from gmaivl_rt.export.onnx_export import export_onnx
    from gmaivl_rt.export.transformers_js import export_transformers_js
    from gmaivl_rt.export.web import export_web

    work = args.demo / "browser_bench"
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.demo / "stage3"
    tjs = args.tjs
    if tjs is None:
        tjs = work / "tjs"
        if not (tjs / "config.json").is_file():
            export_transformers_js(model_dir, tjs, quantize=("q4",), min_agreement={"q4": 0.0})
    export_web(tjs, work / "site", max_new_tokens=args.max_new_tokens, webgpu=False)
    picture = _picture(args.demo, work)
    static = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(work / "site")))
    static.daemon_threads = True
    threading.Thread(target=static.serve_forever, daemon=True).start()
    servers = {}
    for backend in args.server_backends.split(","):
        folder = model_dir
        if backend == "onnx":
            folder = work / "onnx"
            if not (folder / "gmaivl_deploy.json").is_file():
                export_onnx(model_dir, folder)
        servers[backend] = _serve(folder, work, backend)
    driver = _browser(work / "chromium-profile")
    results = {"page fp32": [], "page q4": [], **{f"server ({b})": [] for b in servers}}
    try:
        driver.get(f"http://127.0.0.1:{static.server_port}/index.html")
        status = lambda: driver.find_element("id", "status").text
        _wait(lambda: status() == "ready" or status().startswith("error"), 600, "the page's model")
        if status() != "ready":
            raise RuntimeError(status())
        asks = {"page fp32": lambda: _page_ask(driver, picture, "fp32"),
                "page q4": lambda: _page_ask(driver, picture, "q4"),
                **{f"server ({b})": functools.partial(_server_ask, url, picture, args.max_new_tokens)
                   for b, (_, url) in servers.items()}}
        for ask in asks.values():  # warm-up: model load, WASM compile, first-request paths
            ask()
        for _ in range(args.rounds):
            for name, ask in asks.items():
                time.sleep(1.0)
                results[name].append(ask())
    finally:
        driver.quit()
        for process, _ in servers.values():
            process.terminate()
            process.wait(30)
        static.shutdown()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = os.getloadavg()
    lines = [(f"{when}, load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}, {args.rounds} rounds, "
              f"device {results['page fp32'][0]['device']}"), "",
             "| side | time to first token, median (range) | tokens/s after it, median (range) | tokens |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {_summary(rows)} |" for name, rows in results.items()]
    print("\n".join(lines))
    (work / "browser_vs_server.json").write_text(json.dumps({"when": when, "load_average": load,
                                                             "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

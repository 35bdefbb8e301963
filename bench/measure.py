"""Measurement helpers shared by the benchmarks: wall-clock medians, and peak resident memory of one piece of work
measured in a fresh process.

Peak memory: after set-up the process resets its resident-set high-water mark (`echo 5 > /proc/self/clear_refs`,
Linux >= 4.0), runs the work and reports VmHWM - VmRSS(before), the extra physical memory the work needed at its
peak. torch's CPU allocator hands large blocks straight to the OS and returns them on free, so RSS tracks tensors
(tracemalloc does not see torch's allocations). Where clear_refs is not writable it falls back to ru_maxrss, only
meaningful when set-up dominates earlier peaks; the method used is reported.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


IDLE_GAP_S = 0.2


def interleaved_seconds(fns: dict, rounds: int, warmup: int = 1, gap_s: float = IDLE_GAP_S) -> dict:
    """{name: fn} -> {name: [seconds of each round]}. Every side is warmed up first, then the rounds alternate
    between the sides, so load from other jobs on a shared machine falls on all of them alike rather than on
    whichever side happened to run during it. The order rotates each round (a b c, b c a, c a b, ...), so no side
    always runs right after the same other one, and every timed call starts after `gap_s` seconds of idling: what
    one side leaves running (ONNX Runtime's spin-waiting pool threads, a freed allocator's work) cannot slow the
    next (issue 29: with spinning ONNX threads timed right before it, torch's prefill looked 5-8x slower)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    names = list(fns)
    times = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            time.sleep(gap_s)
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def interleaved_median_seconds(fns: dict, rounds: int, warmup: int = 1, gap_s: float = IDLE_GAP_S) -> dict:
    """{name: fn} -> {name: median seconds} of `interleaved_seconds`."""
    times = interleaved_seconds(fns, rounds, warmup, gap_s)
    return {name: statistics.median(t) for name, t in times.items()}


BENCH_THREADS_ENV = "GMAIVL_BENCH_THREADS"


class PinnedThreads:
    """Every side of a bench on one fixed number of CPU threads, printed beside its figures (issue 29: two-thread
    runs on the shared 2-core machine at nice 15 had each op's two threads waiting for each other, so a figure must
    say what it ran under). The count: `count` when given, else GMAIVL_BENCH_THREADS, else OMP_NUM_THREADS, else 1.
    While entered, torch's
    intra-op threads (`torch.set_num_threads`, which the engine's threads share) and OMP_NUM_THREADS (what a fresh
    process a bench starts sizes its pool by) are that count; both are put back on exit. `text`: the count in
    force, as the figures print it."""

    def __init__(self, count: int | None = None):
        self.asked = count
        self.count = None
        self._saved = None

    def __enter__(self):
        import torch

        raw = str(self.asked) if self.asked is not None else \
            os.environ.get(BENCH_THREADS_ENV) or os.environ.get("OMP_NUM_THREADS") or "1"
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(f"{BENCH_THREADS_ENV} / OMP_NUM_THREADS must be an int >= 1, got {raw!r}")
        self.count = int(raw)
        self._saved = (torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS"))
        torch.set_num_threads(self.count)
        os.environ["OMP_NUM_THREADS"] = str(self.count)
        return self

    def __exit__(self, *exc):
        import torch

        threads, omp = self._saved
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp

    @property
    def text(self) -> str:
        import torch

        return f"{torch.get_num_threads()} thread(s), OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}"


def load_average() -> tuple[float, float, float]:
    """The machine's 1, 5 and 15 minute load averages, recorded beside every figure a bench reports."""
    return os.getloadavg()


def compact_checkpoint(path) -> None:
    """The `compact` preset with seeded random weights, saved to `path` (the CPU benchmarks' shared model)."""
    import torch

    from gmaivl_rt import GMAIVL, GMAIVLConfig

    torch.manual_seed(0)
    GMAIVL(GMAIVLConfig.preset("compact")).save_pretrained(path)


def image_prompt(config, length: int = 96):
    """A (1, length) prompt with one image's tokens at position 8, and that image's (1, 3, S, S) pixels."""
    import torch

    ids = torch.randint(0, config.image_token_index, (1, length))
    ids[0, 8:8 + config.num_image_tokens] = config.image_token_index
    return ids, torch.randn(1, 3, config.vision.image_size, config.vision.image_size)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_extra_mib(work) -> tuple[object, float, str]:
    """Run `work()`; returns (its result, extra peak resident MiB during it, how that was measured)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM after clear_refs"
    except OSError:
        method = "ru_maxrss (clear_refs not writable)"
    before = _rss_kib("VmRSS")
    result = work()
    peak = _rss_kib("VmHWM") if method.startswith("VmHWM") else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return result, (peak - before) / 1024, method


_RUNNER = """
import importlib.util, json, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))
spec = importlib.util.spec_from_file_location("bench_module", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
print(json.dumps(getattr(module, sys.argv[2])(*sys.argv[3:])))
"""


def in_fresh_process(file, function: str, *args, timeout: int = 900) -> dict:
    """Call `function(*args)` (string args) from the module at `file` in a new Python process, on the CPU paths of
    our ops (GMAIVL_KERNELS=auto, no interpreter); returns the dict it returns. The process starts in a temporary
    folder, not the checkout root, where `python -c` would put the root's `kernels/`, `train/` and `export/` first
    on sys.path as bare top-level packages (docs/architecture.md)."""
    env = dict(os.environ, GMAIVL_KERNELS="auto")
    env.pop("TRITON_INTERPRET", None)
    with tempfile.TemporaryDirectory(prefix="gmaivl-bench-") as outside:
        done = subprocess.run([sys.executable, "-c", _RUNNER, str(Path(file).resolve()), function, *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=timeout, cwd=outside, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args} failed in a fresh process:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def alternating_fresh_processes(file, function: str, sides: dict, rounds: int, timeout: int = 900) -> dict:
    """sides: {name: args for `function`}. Runs `in_fresh_process(file, function, *args)` for every side, `rounds`
    times, the order rotating each round (a b, b a, ...) so neither side always runs first or right after the other
    while load from other jobs comes and goes. Returns {name: [the dict of each round]}; each round's ratio between
    sides is a same-run ratio."""
    names = list(sides)
    results = {name: [] for name in names}
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            results[name].append(in_fresh_process(file, function, *sides[name], timeout=timeout))
    return results


def span(values, fmt: str = "{:.2f}") -> str:
    """min-max of a list of figures as text ("1.10-1.45"; one value alone)."""
    low, high = fmt.format(min(values)), fmt.format(max(values))
    return low if low == high else f"{low}-{high}"


def serving(url: str, process, timeout: float = 180.0) -> bool:
    """Poll `url`/health every 0.5 s until it answers 200 (True), or until the server `process` (a Popen) exits or
    `timeout` seconds pass (False); the caller decides what a server that never came up means."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            return False
        time.sleep(0.5)

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
import time


def median_seconds(fn, rounds: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_median_seconds(fns: dict, rounds: int, warmup: int = 1) -> dict:
    """{name: fn} -> {name: median seconds}. Every side is warmed up first, then the rounds alternate between the
    sides (a, b, c, a, b, c, ...), so load from other jobs on a shared machine falls on all of them alike rather
    than on whichever side happened to run during it."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


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
    our ops (GMAIVL_KERNELS=auto, no interpreter); returns the dict it returns."""
    env = dict(os.environ, GMAIVL_KERNELS="auto")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", _RUNNER, str(file), function, *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{function}{args} failed in a fresh process:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])

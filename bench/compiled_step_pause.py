"""The engine's compiled 16-row decode step (a follow-up's 13 new tokens run as decode rows, issue 29) timed back
to back and after 0.2 s idle pauses, with its CPU attention as the engine runs it (`grouped_decode_attention`) and
with the paged decode reference it replaced (scaled_dot_product_attention, keys repeated per head), over block
tables of 4 and 32 blocks (64 and 512 positions): compact preset, random weights, one thread, each variant
compiled afresh (cpp_wrapper, as the engine compiles it).

    flock /tmp/gs/cpu.lock python bench/compiled_step_pause.py [--profile]

--profile: also torch.profiler's table of 20 back-to-back steps of each variant (the compiled graph's call, whose
kernels the C++ wrapper shows as one, against Dynamo's guard lookup and the eager ops around it). Not a test: about a minute (four compiles). bench/idle_pause.c asks the same question of the
machine alone."""
from __future__ import annotations

import os
import statistics
import sys
import time

import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.engine import paged_cache
from gmaivl_rt.engine.compiled_decode import CompiledDecode
from gmaivl_rt.engine.paged_cache import PagedKVCache
from gmaivl_rt.model import ops

ROWS = 16


def timed(step, count: int, pause: float) -> list:
    times = []
    for _ in range(count):
        if pause:
            time.sleep(pause)
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return times


def text(times: list) -> str:
    return f"{1e3 * statistics.median(times):.2f} ms ({1e3 * min(times):.2f}-{1e3 * max(times):.2f})"


@torch.no_grad()
def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = GMAIVLConfig.preset("compact")
    model = GMAIVL(config).eval()
    cache = PagedKVCache(config, num_blocks=64, block_size=16, dtype=torch.float32, device="cpu")
    grouped = paged_cache.grouped_decode_attention
    print(f"load average {os.getloadavg()[0]:.1f}, 1 thread, {ROWS} rows of one sequence's prefill")
    try:
        for width in (4, 32):
            positions = torch.arange(width * 16 - ROWS, width * 16)
            tables = torch.arange(1, width + 1, dtype=torch.int32).repeat(ROWS, 1)
            ids = torch.randint(0, config.text.vocab_size, (ROWS,))
            for name, attention in (("grouped (engine)", grouped), ("paged reference", ops.paged_decode_attention)):
                paged_cache.grouped_decode_attention = attention  # what the cache's attend calls on the CPU
                torch._dynamo.reset()
                compiled = CompiledDecode(model, cache, [ROWS])
                compiled.warm_up()

                def step():
                    compiled.run(ids, positions, tables, (positions + 1).to(torch.int32), positions + 16)
                timed(step, 20, 0)
                back = timed(step, 40, 0)
                paused = timed(step, 12, 0.2)
                print(f"{width * 16} positions, {name}: back to back {text(back)}, after 0.2 s {text(paused)}",
                      flush=True)
                if "--profile" in sys.argv[1:]:
                    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
                        timed(step, 20, 0)
                    print(profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=12), flush=True)
    finally:
        paged_cache.grouped_decode_attention = grouped


if __name__ == "__main__":
    main()

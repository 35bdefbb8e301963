"""Peak memory and time of the loss head. On CPU: our chunked fused linear cross-entropy vs the naive path (full
logits + F.cross_entropy), forward + backward, at InternLM2's vocabulary (V=92544), N=2048 tokens, H=256, fp32;
each side's first run gives its peak memory and warms it up, then the median of three more gives its time.

How memory is measured: each variant runs in a fresh Python process; after the inputs are built, the extra peak
resident memory of forward + backward (bench/measure.py explains how; the method used is recorded in extra_info).
On a GPU (skipped elsewhere): the Triton path at InternLM2-7B's head (8192 tokens,
H=4096, bf16) against the same naive path, peak from torch.cuda.max_memory_allocated. Results are ratios against
the naive path measured in the same run; nothing is asserted.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from measure import alternating_fresh_processes, load_average, peak_extra_mib, span

TOKENS, HIDDEN, VOCAB = 2048, 256, 92544

def measure(variant: str, tokens: str, hidden_size: str, vocab: str, rounds: str = "3") -> dict:
    """Run in a fresh process (measure.in_fresh_process). The first forward + backward gives the extra peak
    resident memory (as a training job's first step meets it) and is the warm-up; `rounds` more are timed and their
    median returned, so first-call costs (thread pool, page faults, lazy initialisation) stay out of the time."""
    tokens, hidden_size, vocab = int(tokens), int(hidden_size), int(vocab)
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size ** 0.5).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,))
    labels[::7] = -100
    loss_fn = fused_linear_cross_entropy if variant == "fused" else fused_linear_cross_entropy_reference

    def step():
        start = time.perf_counter()
        loss_fn(hidden, weight, labels).backward()
        return time.perf_counter() - start

    _, peak, method = peak_extra_mib(step)  # warm-up
    times = []
    for _ in range(int(rounds)):
        hidden.grad = weight.grad = None  # every step allocates its gradients, as the first one did
        times.append(step())
    return {"peak_extra_mib": peak, "seconds": statistics.median(times), "rounds": len(times), "method": method}


ROUNDS = int(os.environ.get("GMAIVL_BENCH_ROUNDS", "3"))


def test_fused_cross_entropy_memory_vs_naive(benchmark, monkeypatch):
    monkeypatch.setenv("GMAIVL_KERNELS", "auto")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        pytest.skip("TRITON_INTERPRET is set; this benchmark measures the CPU (chunked torch) path")
    load_before = load_average()
    # each side in its own fresh process, alternating over GMAIVL_BENCH_ROUNDS rounds: per-round same-run ratios
    runs = alternating_fresh_processes(__file__, "measure", {side: (side, TOKENS, HIDDEN, VOCAB)
                                                             for side in ("fused", "naive")}, ROUNDS, timeout=1800)
    load_after = load_average()
    fused, naive = runs["fused"], runs["naive"]
    memory = [n["peak_extra_mib"] / max(f["peak_extra_mib"], 1e-9) for f, n in zip(fused, naive)]
    speed = [n["seconds"] / f["seconds"] for f, n in zip(fused, naive)]

    torch.manual_seed(0)
    hidden = torch.randn(TOKENS, HIDDEN, requires_grad=True)
    weight = (torch.randn(VOCAB, HIDDEN) / HIDDEN**0.5).requires_grad_()
    labels = torch.randint(0, VOCAB, (TOKENS,))
    benchmark.pedantic(lambda: fused_linear_cross_entropy(hidden, weight, labels).backward(), rounds=1,
                       iterations=1, warmup_rounds=1)

    logits_mib = TOKENS * VOCAB * 4 / 2**20
    benchmark.extra_info.update(
        shape=f"N={TOKENS} H={HIDDEN} V={VOCAB} fp32, forward+backward",
        memory_method=fused[0]["method"],
        timing=f"per round, median of {fused[0]['rounds']} runs after the warm-up run that gave the peak, each side "
               f"in its own process; {ROUNDS} alternating rounds",
        fused_peak_extra_mib=[round(f["peak_extra_mib"], 1) for f in fused],
        naive_peak_extra_mib=[round(n["peak_extra_mib"], 1) for n in naive],
        full_logits_mib=round(logits_mib, 1),
        memory_reduction_vs_naive=[round(m, 2) for m in memory],
        fused_s=[round(f["seconds"], 3) for f in fused],
        naive_s=[round(n["seconds"], 3) for n in naive],
        speedup_vs_naive=[round(x, 3) for x in speed],
        load_average_before=load_before, load_average_after=load_after,
    )
    print(f"\nfused CE, {ROUNDS} alternating rounds (load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
          f"after): peak +{span([f['peak_extra_mib'] for f in fused], '{:.0f}')} MiB, "
          f"{span([f['seconds'] for f in fused])} s | naive: peak +{span([n['peak_extra_mib'] for n in naive], '{:.0f}')}"
          f" MiB, {span([n['seconds'] for n in naive])} s | one (N, V) fp32 logits = {logits_mib:.0f} MiB | memory "
          f"{span(memory, '{:.1f}')}x less, naive time / fused time x{span(speed)} (same-round ratios)")


def test_fused_cross_entropy_gpu_memory_vs_naive(benchmark, monkeypatch):
    from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy_reference

    monkeypatch.setenv("GMAIVL_KERNELS", "auto")
    tokens, hidden_size = 8192, 4096
    torch.manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(VOCAB, hidden_size, device="cuda") / hidden_size**0.5).to(torch.bfloat16)
    weight.requires_grad_()
    labels = torch.randint(0, VOCAB, (tokens,), device="cuda")

    def run(fn):
        fn(hidden, weight, labels).backward()
        hidden.grad = weight.grad = None

    def peak_and_ms(fn):
        run(fn)  # warm-up (autotuning)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run(fn)
        end.record()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, start.elapsed_time(end)

    fused_mib, fused_ms = peak_and_ms(fused_linear_cross_entropy)
    naive_mib, naive_ms = peak_and_ms(fused_linear_cross_entropy_reference)
    benchmark.pedantic(lambda: (run(fused_linear_cross_entropy), torch.cuda.synchronize()), rounds=5)
    benchmark.extra_info.update(shape=f"N={tokens} H={hidden_size} V={VOCAB} bf16, forward+backward",
                                fused_peak_extra_mib=fused_mib, naive_peak_extra_mib=naive_mib,
                                memory_reduction_vs_naive=naive_mib / fused_mib, fused_ms=fused_ms, naive_ms=naive_ms,
                                speedup_vs_naive=naive_ms / fused_ms)
    print(f"\nGPU fused CE: +{fused_mib:.0f} MiB {fused_ms:.1f} ms | naive: +{naive_mib:.0f} MiB {naive_ms:.1f} ms")

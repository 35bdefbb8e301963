"""Projector GEMMs on a GPU: our Triton fused_linear (bias + GELU in the epilogue, autotuned) vs torch's cuBLAS
matmul + bias followed by a separate GELU kernel, in TFLOP/s, forward and forward+backward, bf16, at GMAI-VL's
projector shapes (8 images x 576 patches; 1024 -> 4096 and 4096 -> 4096). Reported as ratios in extra_info
(no timing assertions). Skipped, with the reason, on machines without CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gmaivl_rt.kernels.projector import fused_linear

from gmaivl_rt.kernels._dispatch import kernels

pytestmark = pytest.mark.gpu  # bench/conftest.py skips these, with the reason, where no CUDA device runs Triton

TOKENS = 576 * 8
SHAPES = [(TOKENS, 1024, 4096, "gelu"), (TOKENS, 4096, 4096, None)]


def _torch_linear(x, w, b, activation):
    y = F.linear(x, w, b)
    return F.gelu(y) if activation == "gelu" else y


def _inputs(m, k, n, requires_grad):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16).requires_grad_(requires_grad)
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=requires_grad)
    return x, w, b


def _report(benchmark, cuda_ms, tflops, ours_fn, torch_fn, flops):
    with kernels("triton"):
        ours_fn()  # autotune outside the timed region
        benchmark.pedantic(lambda: (ours_fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
        ours_ms = cuda_ms(ours_fn)
    cublas_ms = cuda_ms(torch_fn)
    ours_tflops, cublas_tflops = tflops(flops, ours_ms), tflops(flops, cublas_ms)
    benchmark.extra_info.update(ours_ms=ours_ms, cublas_ms=cublas_ms, ours_tflops=ours_tflops,
                                cublas_tflops=cublas_tflops, ratio_vs_cublas=ours_tflops / cublas_tflops)
    print(f"\n{benchmark.name}: ours {ours_tflops:.0f} TFLOP/s, torch/cuBLAS {cublas_tflops:.0f} TFLOP/s "
          f"({ours_tflops / cublas_tflops:.2f}x)")


@pytest.mark.parametrize("m,k,n,activation", SHAPES, ids=lambda v: str(v))
def test_fused_linear_forward(benchmark, cuda_ms, tflops, m, k, n, activation):
    x, w, b = _inputs(m, k, n, requires_grad=False)
    _report(benchmark, cuda_ms, tflops, lambda: fused_linear(x, w, b, activation),
            lambda: _torch_linear(x, w, b, activation), flops=2.0 * m * n * k)


@pytest.mark.parametrize("m,k,n,activation", SHAPES, ids=lambda v: str(v))
def test_fused_linear_forward_backward(benchmark, cuda_ms, tflops, m, k, n, activation):
    x, w, b = _inputs(m, k, n, requires_grad=True)
    grad_y = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

    def step(fn):
        def run():
            fn(x, w, b, activation).backward(grad_y)
            x.grad = w.grad = b.grad = None
        return run

    _report(benchmark, cuda_ms, tflops, step(fused_linear), step(_torch_linear), flops=3 * 2.0 * m * n * k)

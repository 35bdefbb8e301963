"""Shared benchmark helpers.

- `pytestmark = pytest.mark.gpu` (the requires-CUDA marker): such benchmarks are skipped, with the reason, where
  no CUDA device runs compiled Triton kernels (a CPU build of torch, or TRITON_INTERPRET set).
- fixtures `cuda_ms(fn, reps=50, warmup=10) -> milliseconds per call` (CUDA events) and
  `tflops(flops, ms) -> TFLOP/s`.
"""
from __future__ import annotations

import os

import pytest
import torch


def cuda_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "GPU benchmark: needs a CUDA device (this torch build / machine has none)"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "GPU benchmark: TRITON_INTERPRET is set, so Triton kernels would be interpreted, not compiled"
    return None


def pytest_collection_modifyitems(config, items):
    reason = cuda_skip_reason()
    if reason is None:
        return
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(pytest.mark.skip(reason=reason))


def _cuda_ms(fn, reps: int = 50, warmup: int = 10) -> float:
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.fixture
def cuda_ms():
    return _cuda_ms


@pytest.fixture
def tflops():
    return lambda flops, ms: flops / (ms * 1e-3) / 1e12

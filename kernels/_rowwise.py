"""Shared plumbing of the row-wise kernels (RMSNorm, LayerNorm, RoPE, SwiGLU): flattening to rows, block sizes,
warp counts and the number of programs that accumulate weight-gradient partial sums."""
from __future__ import annotations

import torch
import triton

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# Above this many elements per row a program would hold too much in registers (Liger uses the same cap).
MAX_ROW_BLOCK = 65536


def check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of float32, float16, bfloat16")


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """(..., n) -> contiguous (rows, n); a copy only when x is not contiguous already."""
    return x.contiguous().view(-1, x.shape[-1])


def row_block(n_cols: int, name: str = "row") -> int:
    """One program covers a whole row: the next power of two at or above its width, masked at the tail."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_ROW_BLOCK:
        raise ValueError(f"{name} width {n_cols} exceeds the largest supported row of {MAX_ROW_BLOCK} elements")
    return block


def warps_for_block(block: int) -> int:
    """Wider rows get more threads so each thread holds a bounded slice of the row (the heuristic Liger uses)."""
    if block >= 32768:
        return 32
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


def partial_sum_programs(n_rows: int, device: torch.device) -> int:
    """Programs of a weight-gradient kernel: one per SM on a GPU (each sums its slice of rows into one partial row,
    the partials are reduced afterwards), a handful under the interpreter."""
    if device.type == "cuda":
        programs = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        programs = 4
    return max(1, min(programs, n_rows))


def backward_warps_for_block(block: int) -> int:
    """The norm backward kernels keep several row-sized values live per step (x, dy, weight, the weight-gradient
    partial sums, three row pointers): one warp per 128 columns keeps them clear of register spills (at 4096
    columns LayerNorm's backward spills with 16 warps on sm_80, not with 32)."""
    return min(32, max(4, block // 128))

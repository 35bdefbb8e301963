"""RMSNorm (Llama / InternLM2): y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32.

Triton: one program per row for the forward (which saves the fp32 reciprocal std per row); the backward runs one
program per slice of rows, writing dX row by row and summing its slice's dWeight into one fp32 partial row, and the
partial rows are reduced with a torch sum afterwards (as Liger-Kernel does).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._dispatch import use_triton
from ._rowwise import (as_rows, backward_warps_for_block, check_float, partial_sum_programs, row_block,
                       warps_for_block)
from ._spec import KernelSpec, Roofline


def rms_norm(x, weight, eps=1e-6):
    """x: (..., H) any float dtype; weight: (H,). Returns x's shape, in x's dtype promoted with weight's."""
    if use_triton(x, weight):
        if torch.compiler.is_compiling():  # the registered op: torch.compile keeps the kernel, traces around it
            return torch.ops.gmaivl.rms_norm(x, weight, float(eps))
        return _rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x, weight, eps=1e-6):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


@triton.jit
def _rms_norm_fwd_kernel(Y, X, W, RSTD, n_cols, eps, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # The normalised row is rounded to x's dtype before the weight multiplies it, as transformers does.
    x_hat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Y + row * n_cols + cols, (x_hat * w).to(Y.dtype.element_ty), mask=mask)
    tl.store(RSTD + row, rstd)


@triton.jit
def _rms_norm_bwd_kernel(DX, DW_PARTIAL, DY, X, W, RSTD, n_rows, n_cols, rows_per_program,
                         BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Row pointers advance by one row per step (64-bit base offset: rows * cols can pass 2^31).
    row_offset = row_start.to(tl.int64) * n_cols
    X += row_offset
    DY += row_offset
    DX += row_offset
    for row in range(row_start, row_end):
        x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        x_hat = x * rstd
        grad_x_hat = dy * w
        # d/dx of x * rstd(x): rstd * (g - x_hat * mean(g * x_hat)).
        dx = rstd * (grad_x_hat - x_hat * (tl.sum(grad_x_hat * x_hat, axis=0) / n_cols))
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat.to(X.dtype.element_ty).to(tl.float32)
        X += n_cols
        DY += n_cols
        DX += n_cols
    tl.store(DW_PARTIAL + pid.to(tl.int64) * n_cols + cols, dw_acc, mask=mask)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x_rows = as_rows(x)
        n_rows, n_cols = x_rows.shape
        block = row_block(n_cols, "rms_norm: x")
        y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows > 0:
            _rms_norm_fwd_kernel[(n_rows,)](y, x_rows, weight, rstd, n_cols, eps, BLOCK_SIZE=block,
                                            num_warps=warps_for_block(block))
        ctx.save_for_backward(x_rows, weight, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_rows, weight, rstd = ctx.saved_tensors
        n_rows, n_cols = x_rows.shape
        block = row_block(n_cols)
        dy_rows = as_rows(dy)
        dx = torch.empty_like(x_rows)
        programs = partial_sum_programs(n_rows, x_rows.device)
        rows_per_program = triton.cdiv(n_rows, programs)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x_rows.device)
        _rms_norm_bwd_kernel[(programs,)](dx, dw_partial, dy_rows, x_rows, weight, rstd, n_rows, n_cols,
                                          rows_per_program, BLOCK_SIZE=block,
                                          num_warps=backward_warps_for_block(block))
        return dx.view(ctx.x_shape), dw_partial.sum(0).to(weight.dtype), None


def _rms_norm_triton(x, weight, eps):
    check_float("rms_norm: x", x)
    check_float("rms_norm: weight", weight)
    if x.dim() == 0 or weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)} but x has shape {tuple(x.shape)}; "
                         f"weight must be (H,) with H = x.shape[-1]")
    return _RMSNormFunction.apply(x, weight.contiguous(), float(eps))


@torch.library.custom_op("gmaivl::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The Triton forward as a torch.library op (inference: no autograd), for compiled graphs."""
    return _rms_norm_triton(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


# Hidden sizes the report compiles for: InternLM2.5-7B (GMAI-VL's LLM) is the default.
_REPORT_HIDDEN = {4096: True, 2048: False}


def report_specs() -> list[KernelSpec]:
    """Forward and backward at each representative hidden size, bf16 activations and weight."""
    specs = []
    for hidden, default in _REPORT_HIDDEN.items():
        block = row_block(hidden)
        warps = warps_for_block(block)
        tokens = 8192
        shape = f"tokens={tokens} hidden={hidden} bf16"
        elems = tokens * hidden
        specs.append(KernelSpec(
            kernel="rms_norm_fwd", fn=_rms_norm_fwd_kernel,
            signature={"Y": "*bf16", "X": "*bf16", "W": "*bf16", "RSTD": "*fp32", "n_cols": "i32", "eps": "fp32",
                       "BLOCK_SIZE": "constexpr"},
            constexprs={"BLOCK_SIZE": block}, num_warps=warps, default=default,
            # read x, write y (2 B each), weight once, rstd (4 B per row); square, sum, scale, weight.
            roofline=Roofline(shape=shape, flops=4 * elems, bytes=4 * elems + 2 * hidden + 4 * tokens)))
        programs = 132  # one per SM of an H100
        specs.append(KernelSpec(
            kernel="rms_norm_bwd", fn=_rms_norm_bwd_kernel,
            signature={"DX": "*bf16", "DW_PARTIAL": "*fp32", "DY": "*bf16", "X": "*bf16", "W": "*bf16",
                       "RSTD": "*fp32", "n_rows": "i32", "n_cols": "i32", "rows_per_program": "i32",
                       "BLOCK_SIZE": "constexpr"},
            constexprs={"BLOCK_SIZE": block}, num_warps=backward_warps_for_block(block), default=default,
            # read x and dy, write dx (2 B each), rstd, fp32 dW partials per program.
            roofline=Roofline(shape=shape, flops=8 * elems,
                              bytes=6 * elems + 2 * hidden + 4 * tokens + 4 * programs * hidden)))
    return specs

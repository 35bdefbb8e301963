"""LayerNorm (CLIP vision tower), statistics in fp32.

Triton: one program per row for the forward (which saves the fp32 mean and reciprocal std per row); the backward
runs one program per slice of rows, writing dX row by row and summing its slice's dWeight and dBias into fp32
partial rows that a torch sum reduces afterwards (as Liger-Kernel does).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._dispatch import use_triton
from ._rowwise import (as_rows, backward_warps_for_block, check_float, partial_sum_programs, row_block,
                       warps_for_block)
from ._spec import KernelSpec, Roofline


def layer_norm(x, weight, bias, eps=1e-5):
    """x: (..., H); weight, bias: (H,) (bias may be None). Returns x's shape and dtype."""
    if use_triton(x, weight):
        return _layer_norm_triton(x, weight, bias, eps)
    return layer_norm_reference(x, weight, bias, eps)


def layer_norm_reference(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


@triton.jit
def _layer_norm_fwd_kernel(Y, X, W, B, MEAN, RSTD, n_cols, eps, HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    x = tl.load(X + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    # Two-pass variance (centre first): no cancellation for rows with a large mean.
    centred = tl.where(mask, x - mean, 0.0)
    rstd = tl.rsqrt(tl.sum(centred * centred, axis=0) / n_cols + eps)
    y = centred * rstd * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * n_cols + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(DX, DW_PARTIAL, DB_PARTIAL, DY, X, W, MEAN, RSTD, n_rows, n_cols, rows_per_program,
                           HAS_BIAS: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_SIZE)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_SIZE,), dtype=tl.float32)
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
        x_hat = tl.where(mask, (x - tl.load(MEAN + row)) * tl.load(RSTD + row), 0.0)
        grad_x_hat = dy * w
        # d/dx of (x - mean) * rstd: rstd * (g - mean(g) - x_hat * mean(g * x_hat)).
        dx = (grad_x_hat - tl.sum(grad_x_hat, axis=0) / n_cols
              - x_hat * (tl.sum(grad_x_hat * x_hat, axis=0) / n_cols)) * tl.load(RSTD + row)
        tl.store(DX + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw_acc += dy * x_hat
        db_acc += dy
        X += n_cols
        DY += n_cols
        DX += n_cols
    partial_offset = pid.to(tl.int64) * n_cols + cols
    tl.store(DW_PARTIAL + partial_offset, dw_acc, mask=mask)
    if HAS_BIAS:
        tl.store(DB_PARTIAL + partial_offset, db_acc, mask=mask)


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, eps):
        x_rows = as_rows(x)
        n_rows, n_cols = x_rows.shape
        block = row_block(n_cols, "layer_norm: x")
        y = torch.empty_like(x_rows)
        mean = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
        if n_rows > 0:
            # Without a bias the kernel never reads B; any pointer will do.
            _layer_norm_fwd_kernel[(n_rows,)](y, x_rows, weight, weight if bias is None else bias, mean, rstd,
                                              n_cols, eps, HAS_BIAS=bias is not None, BLOCK_SIZE=block,
                                              num_warps=warps_for_block(block))
        ctx.save_for_backward(x_rows, weight, mean, rstd)
        ctx.x_shape = x.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y.view(x.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x_rows, weight, mean, rstd = ctx.saved_tensors
        n_rows, n_cols = x_rows.shape
        block = row_block(n_cols)
        has_bias = ctx.bias_dtype is not None
        dx = torch.empty_like(x_rows)
        programs = partial_sum_programs(n_rows, x_rows.device)
        dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x_rows.device)
        db_partial = torch.empty_like(dw_partial) if has_bias else dw_partial
        _layer_norm_bwd_kernel[(programs,)](dx, dw_partial, db_partial, as_rows(dy), x_rows, weight, mean, rstd,
                                            n_rows, n_cols, triton.cdiv(n_rows, programs), HAS_BIAS=has_bias,
                                            BLOCK_SIZE=block, num_warps=backward_warps_for_block(block))
        dbias = db_partial.sum(0).to(ctx.bias_dtype) if has_bias else None
        return dx.view(ctx.x_shape), dw_partial.sum(0).to(weight.dtype), dbias, None


def _layer_norm_triton(x, weight, bias, eps):
    check_float("layer_norm: x", x)
    hidden = x.shape[-1] if x.dim() else None
    for name, param in (("weight", weight), ("bias", bias)):
        if param is None:
            if name == "bias":
                continue
            raise ValueError("layer_norm: weight is None; the Triton LayerNorm needs an affine weight")
        check_float(f"layer_norm: {name}", param)
        if param.shape != (hidden,):
            raise ValueError(f"layer_norm: {name} has shape {tuple(param.shape)} but x has shape {tuple(x.shape)}; "
                             f"{name} must be (H,) with H = x.shape[-1]")
    return _LayerNormFunction.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(), float(eps))


# Hidden sizes the report compiles for: CLIP ViT-L/14 (GMAI-VL's vision tower) is the default; 4096 is the
# LayerNorm(4C) in front of an InternVL-style projector.
_REPORT_HIDDEN = {1024: True, 4096: False}


def report_specs() -> list[KernelSpec]:
    """Forward and backward (with bias) at each representative hidden size, bf16 activations and parameters."""
    specs = []
    for hidden, default in _REPORT_HIDDEN.items():
        block = row_block(hidden)
        warps = warps_for_block(block)
        tokens = 8 * 577  # a batch of 8 images through ViT-L/14 at 336 px (576 patches + CLS)
        shape = f"tokens={tokens} hidden={hidden} bf16"
        elems = tokens * hidden
        constexprs = {"HAS_BIAS": True, "BLOCK_SIZE": block}
        specs.append(KernelSpec(
            kernel="layer_norm_fwd", fn=_layer_norm_fwd_kernel,
            signature={"Y": "*bf16", "X": "*bf16", "W": "*bf16", "B": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32",
                       "n_cols": "i32", "eps": "fp32", "HAS_BIAS": "constexpr", "BLOCK_SIZE": "constexpr"},
            constexprs=constexprs, num_warps=warps, default=default,
            # read x, write y (2 B each), weight and bias once, mean and rstd (4 B each per row).
            roofline=Roofline(shape=shape, flops=7 * elems, bytes=4 * elems + 4 * hidden + 8 * tokens)))
        programs = 132  # one per SM of an H100
        specs.append(KernelSpec(
            kernel="layer_norm_bwd", fn=_layer_norm_bwd_kernel,
            signature={"DX": "*bf16", "DW_PARTIAL": "*fp32", "DB_PARTIAL": "*fp32", "DY": "*bf16", "X": "*bf16",
                       "W": "*bf16", "MEAN": "*fp32", "RSTD": "*fp32", "n_rows": "i32", "n_cols": "i32",
                       "rows_per_program": "i32", "HAS_BIAS": "constexpr", "BLOCK_SIZE": "constexpr"},
            constexprs=constexprs, num_warps=backward_warps_for_block(block), default=default,
            # read x and dy, write dx (2 B each), mean and rstd, fp32 dW and dB partials per program.
            roofline=Roofline(shape=shape, flops=12 * elems,
                              bytes=6 * elems + 2 * hidden + 8 * tokens + 8 * programs * hidden)))
    return specs

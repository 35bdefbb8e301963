"""SwiGLU gate of the Llama / InternLM2 MLP: silu(gate) * up.

Triton: the op is elementwise, so the kernels run over the flattened tensors in fixed 1024-element blocks (no row
structure needed, no idle lanes at widths such as 14336 that are not a power of two). The backward recomputes
sigmoid(gate) in fp32 rather than saving silu(gate):
    d_up = dy * silu(g),    d_gate = dy * up * sigmoid(g) * (1 + g * (1 - sigmoid(g))).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._dispatch import use_triton
from ._rowwise import check_float
from ._spec import KernelSpec, Roofline


def swiglu(gate, up):
    """gate, up: (..., I), same shape and dtype. Returns silu(gate) * up."""
    if use_triton(gate, up):
        if torch.compiler.is_compiling():  # the registered op: torch.compile keeps the kernel, traces around it
            return torch.ops.gmaivl.swiglu(gate, up)
        return _swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def swiglu_reference(gate, up):
    return F.silu(gate) * up


@triton.jit
def _swiglu_fwd_kernel(OUT, GATE, UP, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + offs, (gate * tl.sigmoid(gate) * up).to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(D_GATE, D_UP, D_OUT, GATE, UP, n_elements, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n_elements
    d_out = tl.load(D_OUT + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(GATE + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(UP + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(gate)
    silu = gate * sig
    tl.store(D_UP + offs, (d_out * silu).to(D_UP.dtype.element_ty), mask=mask)
    # silu'(g) = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
    d_gate = d_out * up * sig * (1.0 + gate * (1.0 - sig))
    tl.store(D_GATE + offs, d_gate.to(D_GATE.dtype.element_ty), mask=mask)


BLOCK_SIZE = 1024  # 8 bf16 values per thread with 4 warps: one 16-byte vector load per tensor
NUM_WARPS = 4


def _grid(n_elements):
    return (triton.cdiv(n_elements, BLOCK_SIZE),)


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        if gate.numel():
            _swiglu_fwd_kernel[_grid(gate.numel())](out, gate, up, gate.numel(), BLOCK_SIZE=BLOCK_SIZE,
                                                    num_warps=NUM_WARPS)
        ctx.save_for_backward(gate, up)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out):
        gate, up = ctx.saved_tensors
        d_out = d_out.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        if gate.numel():
            _swiglu_bwd_kernel[_grid(gate.numel())](d_gate, d_up, d_out, gate, up, gate.numel(),
                                                    BLOCK_SIZE=BLOCK_SIZE, num_warps=NUM_WARPS)
        return d_gate, d_up


def _swiglu_triton(gate, up):
    check_float("swiglu: gate", gate)
    check_float("swiglu: up", up)
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         f"must have the same shape and dtype")
    return _SwiGLUFunction.apply(gate, up)


@torch.library.custom_op("gmaivl::swiglu", mutates_args=())
def _swiglu_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The Triton forward as a torch.library op (inference: no autograd), for compiled graphs."""
    return _swiglu_triton(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty_like(gate)


def report_specs() -> list[KernelSpec]:
    """Forward and backward, bf16, with the one block size they launch with; roofline at InternLM2.5-7B's MLP."""
    tokens, intermediate = 8192, 14336
    elems = tokens * intermediate
    shape = f"tokens={tokens} intermediate={intermediate} bf16"
    constexprs = {"BLOCK_SIZE": BLOCK_SIZE}
    return [
        KernelSpec(kernel="swiglu_fwd", fn=_swiglu_fwd_kernel,
                   signature={"OUT": "*bf16", "GATE": "*bf16", "UP": "*bf16", "n_elements": "i32",
                              "BLOCK_SIZE": "constexpr"},
                   constexprs=constexprs, num_warps=NUM_WARPS, default=True,
                   # read gate and up, write out (2 B each); sigmoid, two multiplies (+ exp counted as one).
                   roofline=Roofline(shape=shape, flops=4 * elems, bytes=6 * elems)),
        KernelSpec(kernel="swiglu_bwd", fn=_swiglu_bwd_kernel,
                   signature={"D_GATE": "*bf16", "D_UP": "*bf16", "D_OUT": "*bf16", "GATE": "*bf16", "UP": "*bf16",
                              "n_elements": "i32", "BLOCK_SIZE": "constexpr"},
                   constexprs=constexprs, num_warps=NUM_WARPS, default=True,
                   # read d_out, gate and up, write d_gate and d_up (2 B each).
                   roofline=Roofline(shape=shape, flops=10 * elems, bytes=10 * elems)),
    ]

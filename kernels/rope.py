"""Rotary position embedding (rotate-half convention of Llama / InternLM2).

Triton: one program per token rotates all of its query heads and key heads, reading that token's cos/sin row once.
With x = [x1, x2] (the two halves of a head), rotate_half(x) = [-x2, x1] and the forward is
    y1 = x1 * cos1 - x2 * sin1,    y2 = x2 * cos2 + x1 * sin2.
The backward is the transpose of that linear map, i.e. the same rotation with -sin (halves swapped):
    dx1 = dy1 * cos1 + dy2 * sin2,  dx2 = dy2 * cos2 - dy1 * sin1.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._dispatch import use_triton
from ._rowwise import check_float
from ._spec import KernelSpec, Roofline


def rope_cos_sin(position_ids, head_dim, theta=10000.0, dtype=torch.float32):
    """position_ids: (...,) int. Returns cos, sin of shape (..., head_dim), computed in fp32, cast to dtype."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.int64).float()
                                / head_dim))
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(q, k, cos, sin):
    """q: (..., Hq, D), k: (..., Hkv, D); cos, sin: (..., D) broadcast over heads. Returns (q, k) rotated."""
    if use_triton(q, k):
        if torch.compiler.is_compiling():  # the registered op: torch.compile keeps the kernel, traces around it
            return torch.ops.gmaivl.apply_rope(q, k, cos, sin)
        return _apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


@triton.jit
def _rotate_heads(OUT, X, tokens, token_mask, n_heads, head_dim, half_cols, half_mask, cos1, cos2, sin1, sin2,
                  BLOCK_HEADS: tl.constexpr):
    """Rotate the (tokens, n_heads, head_dim) tile: first halves at half_cols, second halves half further on.
    cos*/sin* are (BLOCK_TOKENS, BLOCK_HALF) and broadcast over the heads."""
    heads = tl.arange(0, BLOCK_HEADS)
    offs = (tokens[:, None, None] * n_heads * head_dim + heads[None, :, None] * head_dim
            + half_cols[None, None, :])
    mask = token_mask[:, None, None] & (heads[None, :, None] < n_heads) & half_mask[None, None, :]
    half = head_dim // 2
    x1 = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + offs + half, mask=mask, other=0.0).to(tl.float32)
    y1 = x1 * cos1[:, None, :] - x2 * sin1[:, None, :]
    y2 = x2 * cos2[:, None, :] + x1 * sin2[:, None, :]
    tl.store(OUT + offs, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(OUT + offs + half, y2.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(Q_OUT, K_OUT, Q, K, COS, SIN, n_tokens, n_q_heads, n_k_heads, head_dim,
                 BLOCK_TOKENS: tl.constexpr, BLOCK_Q_HEADS: tl.constexpr, BLOCK_K_HEADS: tl.constexpr,
                 BLOCK_HALF: tl.constexpr, BACKWARD: tl.constexpr):
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_TOKENS + tl.arange(0, BLOCK_TOKENS)
    token_mask = tokens < n_tokens
    half = head_dim // 2
    half_cols = tl.arange(0, BLOCK_HALF)
    half_mask = half_cols < half
    trig = tokens[:, None] * head_dim + half_cols[None, :]
    trig_mask = token_mask[:, None] & half_mask[None, :]
    cos1 = tl.load(COS + trig, mask=trig_mask, other=0.0).to(tl.float32)
    cos2 = tl.load(COS + trig + half, mask=trig_mask, other=0.0).to(tl.float32)
    sin1 = tl.load(SIN + trig, mask=trig_mask, other=0.0).to(tl.float32)
    sin2 = tl.load(SIN + trig + half, mask=trig_mask, other=0.0).to(tl.float32)
    if BACKWARD:
        # Transpose of the rotation: the forward formulas with (sin1, sin2) -> (-sin2, -sin1).
        sin1, sin2 = -sin2, -sin1
    _rotate_heads(Q_OUT, Q, tokens, token_mask, n_q_heads, head_dim, half_cols, half_mask, cos1, cos2, sin1, sin2,
                  BLOCK_HEADS=BLOCK_Q_HEADS)
    _rotate_heads(K_OUT, K, tokens, token_mask, n_k_heads, head_dim, half_cols, half_mask, cos1, cos2, sin1, sin2,
                  BLOCK_HEADS=BLOCK_K_HEADS)


# A program's query tile (tokens x heads x half head_dim) holds up to this many elements: one token of a 32-head,
# 128-dim model, or many tokens of a small one (fewer, fuller programs; the interpreter also runs far fewer).
_TILE_ELEMENTS = 2048


def _rope_config(n_tokens, n_q_heads, n_k_heads, head_dim):
    """Block sizes and warps for one launch: (BLOCK_TOKENS, BLOCK_Q_HEADS, BLOCK_K_HEADS, BLOCK_HALF, num_warps)."""
    block_q, block_k = triton.next_power_of_2(n_q_heads), triton.next_power_of_2(n_k_heads)
    block_half = triton.next_power_of_2(head_dim // 2)
    block_tokens = max(1, min(triton.next_power_of_2(n_tokens), _TILE_ELEMENTS // (block_q * block_half)))
    # About 8 query elements per thread: both halves of x, cos/sin and 64-bit pointers stay well inside registers.
    num_warps = 4 if block_tokens * block_q * block_half <= 1024 else 8
    return block_tokens, block_q, block_k, block_half, num_warps


def _rope_launch(q_out, k_out, q, k, cos, sin, backward):
    """q, k, q_out, k_out: contiguous (tokens, heads, head_dim); cos, sin: contiguous (tokens, head_dim)."""
    n_tokens, n_q_heads, head_dim = q.shape
    n_k_heads = k.shape[1]
    if n_tokens == 0:
        return
    block_tokens, block_q, block_k, block_half, num_warps = _rope_config(n_tokens, n_q_heads, n_k_heads, head_dim)
    _rope_kernel[(triton.cdiv(n_tokens, block_tokens),)](
        q_out, k_out, q, k, cos, sin, n_tokens, n_q_heads, n_k_heads, head_dim, BLOCK_TOKENS=block_tokens,
        BLOCK_Q_HEADS=block_q, BLOCK_K_HEADS=block_k, BLOCK_HALF=block_half, BACKWARD=backward,
        num_warps=num_warps)


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        head_dim = q.shape[-1]
        q_rows = q.contiguous().view(-1, q.shape[-2], head_dim)
        k_rows = k.contiguous().view(-1, k.shape[-2], head_dim)
        # cos/sin broadcast over the heads (and over any leading dims of size 1, e.g. a batch of one position row).
        cos_rows = cos.expand(*q.shape[:-2], head_dim).reshape(-1, head_dim).contiguous()
        sin_rows = sin.expand(*q.shape[:-2], head_dim).reshape(-1, head_dim).contiguous()
        q_out = torch.empty(q_rows.shape, dtype=torch.promote_types(q.dtype, cos.dtype), device=q.device)
        k_out = torch.empty(k_rows.shape, dtype=torch.promote_types(k.dtype, cos.dtype), device=k.device)
        _rope_launch(q_out, k_out, q_rows, k_rows, cos_rows, sin_rows, backward=False)
        ctx.save_for_backward(cos_rows, sin_rows)
        ctx.shapes_and_dtypes = (q.shape, q.dtype, k.shape, k.dtype)
        return q_out.view(q.shape), k_out.view(k.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, dq_out, dk_out):
        cos_rows, sin_rows = ctx.saved_tensors
        q_shape, q_dtype, k_shape, k_dtype = ctx.shapes_and_dtypes
        head_dim = q_shape[-1]
        dq_out = dq_out.contiguous().view(-1, q_shape[-2], head_dim)
        dk_out = dk_out.contiguous().view(-1, k_shape[-2], head_dim)
        dq = torch.empty(dq_out.shape, dtype=q_dtype, device=dq_out.device)
        dk = torch.empty(dk_out.shape, dtype=k_dtype, device=dk_out.device)
        _rope_launch(dq, dk, dq_out, dk_out, cos_rows, sin_rows, backward=True)
        return dq.view(q_shape), dk.view(k_shape), None, None


def _apply_rope_triton(q, k, cos, sin):
    for name, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin)):
        check_float(f"apply_rope: {name}", t)
    if q.dim() < 2 or k.dim() != q.dim() or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (..., heads, head_dim) "
                         f"with the same leading dims and head_dim")
    head_dim = q.shape[-1]
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim {head_dim} must be even (rotate-half pairs its two halves)")
    lead = tuple(q.shape[:-2])
    for name, t in (("cos", cos), ("sin", sin)):
        if (t.dim() > len(lead) + 1 or t.shape[-1] != head_dim
                or any(c not in (1, s) for c, s in zip(reversed(t.shape[:-1]), reversed(lead)))):
            raise ValueError(f"apply_rope: {name} has shape {tuple(t.shape)}; expected {lead + (head_dim,)} "
                             f"(q's leading dims then head_dim, size-1 dims broadcast)")
    return _RoPEFunction.apply(q, k, cos, sin)


@torch.library.custom_op("gmaivl::apply_rope", mutates_args=())
def _apply_rope_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                     torch.Tensor]:
    """The Triton forward as a torch.library op (inference: no autograd), for compiled graphs."""
    rq, rk = _apply_rope_triton(q, k, cos, sin)
    return rq.clone() if rq is q else rq, rk.clone() if rk is k else rk


@_apply_rope_op.register_fake
def _(q, k, cos, sin):
    return torch.empty_like(q), torch.empty_like(k)


# (query heads, key/value heads, head_dim) the report compiles for: InternLM2.5-7B (GQA 32/8, 128) is the default.
_REPORT_HEADS = {(32, 8, 128): True, (4, 2, 64): False}


def report_specs() -> list[KernelSpec]:
    """Forward and backward (the same kernel with BACKWARD set) per head layout, bf16 q/k and cos/sin."""
    specs = []
    for (n_q_heads, n_k_heads, head_dim), default in _REPORT_HEADS.items():
        tokens = 8192
        block_tokens, block_q, block_k, block_half, num_warps = _rope_config(tokens, n_q_heads, n_k_heads, head_dim)
        shape = f"tokens={tokens} q_heads={n_q_heads} kv_heads={n_k_heads} head_dim={head_dim} bf16"
        elems = tokens * (n_q_heads + n_k_heads) * head_dim
        for backward in (False, True):
            specs.append(KernelSpec(
                kernel="rope_bwd" if backward else "rope_fwd", fn=_rope_kernel,
                signature={"Q_OUT": "*bf16", "K_OUT": "*bf16", "Q": "*bf16", "K": "*bf16", "COS": "*bf16",
                           "SIN": "*bf16", "n_tokens": "i32", "n_q_heads": "i32", "n_k_heads": "i32",
                           "head_dim": "i32", "BLOCK_TOKENS": "constexpr", "BLOCK_Q_HEADS": "constexpr",
                           "BLOCK_K_HEADS": "constexpr", "BLOCK_HALF": "constexpr", "BACKWARD": "constexpr"},
                constexprs={"BLOCK_TOKENS": block_tokens, "BLOCK_Q_HEADS": block_q, "BLOCK_K_HEADS": block_k,
                            "BLOCK_HALF": block_half, "BACKWARD": backward},
                num_warps=num_warps, default=default,
                # read and write q and k (2 B each), cos and sin once per token; 3 flops per element.
                roofline=Roofline(shape=shape, flops=3 * elems, bytes=4 * elems + 4 * tokens * head_dim)))
    return specs

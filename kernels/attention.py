"""Fused attention (FlashAttention-2 algorithm), padded and packed variable-length layouts.

Layouts:
- padded: q (batch, seq, heads, head_dim), k/v (batch, seq_k, kv_heads, head_dim)
- packed: q (total_tokens, heads, head_dim) with int32 `cu_seqlens` (n + 1,): block-diagonal attention.
k/v heads must divide q heads (grouped- and multi-query attention). Returns the layout it was given.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Scaled dot-product attention.

    q: (B, S, Hq, D) or (T, Hq, D) with cu_seqlens; k, v: same layout with Hkv heads, Hq % Hkv == 0.
    fp32/fp16/bf16; accumulation in fp32. Returns a tensor shaped and typed like q.
    """
    _check_shapes(q, k, v, cu_seqlens)
    if use_triton(q, k, v):
        return _attention_triton(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)
    return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens)


def _check_shapes(q, k, v, cu_seqlens):
    want = 3 if cu_seqlens is not None else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            layout = "(total_tokens, heads, head_dim) with cu_seqlens" if want == 3 else "(batch, seq, heads, head_dim)"
            raise ValueError(f"attention: {name} has shape {tuple(t.shape)}; expected {layout}")
    if k.shape != v.shape:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ")
    if q.shape[-1] != k.shape[-1] or q.shape[-2] % k.shape[-2]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)}: head dims must match and "
                         "kv heads must divide q heads")
    if cu_seqlens is not None and (cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1):
        raise ValueError("attention: cu_seqlens must be a 1-D int32 tensor of shape (n + 1,)")


def _sdpa(q, k, v, causal, scale):
    """(B, S, H, D) in and out, through torch's SDPA."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale,
                                         enable_gqa=q.shape[1] != k.shape[1])
    return out.transpose(1, 2)


def attention_reference(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Plain PyTorch attention with the same contract as `attention` (per-sequence SDPA when packed)."""
    if cu_seqlens is None:
        return _sdpa(q, k, v, causal, softmax_scale)
    bounds = cu_seqlens.tolist()
    lengths = {e - s for s, e in zip(bounds[:-1], bounds[1:])}
    n = len(bounds) - 1
    if len(lengths) == 1 and bounds[-1] == q.shape[0]:  # equal lengths: one batched call
        (length,) = lengths
        shape = lambda t: t.reshape(n, length, *t.shape[1:])  # noqa: E731
        return _sdpa(shape(q), shape(k), shape(v), causal, softmax_scale).reshape(q.shape)
    out = torch.empty_like(q)
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[s:e] = _sdpa(q[None, s:e], k[None, s:e], v[None, s:e], causal, softmax_scale)[0]
    return out


def _attention_triton(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen):
    raise NotImplementedError("Triton attention kernel not written yet")

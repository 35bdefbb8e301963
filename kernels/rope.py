"""Rotary position embedding (rotate-half convention of Llama / InternLM2)."""
from __future__ import annotations

import torch

from ._dispatch import use_triton


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
        return _apply_rope_triton(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q, k, cos, sin):
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _apply_rope_triton(q, k, cos, sin):
    raise NotImplementedError

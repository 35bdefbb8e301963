"""Decode attention: one new query token per sequence over a KV cache (flash-decoding split along the cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None):
    """q: (B, Hq, D); k_cache, v_cache: (B, L, Hkv, D); cache_seqlens: (B,) int32, valid entries per
    sequence (the new token's k/v already written at position cache_seqlens - 1). Returns (B, Hq, D)."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} must be (B, Hq, D) and k/v caches "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} (B, L, Hkv, D)")
    if use_triton(q, k_cache, v_cache):
        return _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale)


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None):
    B, L = k_cache.shape[:2]
    valid = torch.arange(L, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=softmax_scale, enable_gqa=q.shape[1] != k_cache.shape[2])
    return out[:, :, 0, :]


def _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale):
    raise NotImplementedError("Triton decode attention kernel not written yet")

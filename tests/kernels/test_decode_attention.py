"""Triton flash-decoding (interpreted on CPU) against torch SDPA with a cache-length mask.

Tolerances (max abs error vs the fp32 reference on the same, upcast, inputs; outputs are O(1)):
  fp32: 1e-5    fp16: 2e-3    bf16: 2e-2 (the interpreter upcasts bf16, see the kernel's UPCAST)
"""
import importlib

import pytest
import torch

from gmaivl_rt.kernels._dispatch import kernels
from gmaivl_rt.kernels.decode_attention import decode_attention, decode_attention_reference
from gmaivl_rt.kernels.decode_attention import _decode_attention_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _check(q, k_cache, v_cache, cache_seqlens, num_splits=None, softmax_scale=None):
    out = _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), cache_seqlens,
                                     softmax_scale=softmax_scale)
    torch.testing.assert_close(out.float(), ref, atol=TOL[q.dtype], rtol=0)


# (batch, cache_len, q_heads, kv_heads, head_dim, num_splits): MHA, GQA, MQA; head dim 80; one split, several,
# more splits than 64-entry blocks (empty splits), and the automatic choice (None).
CASES = [(2, 100, 4, 2, 32, None), (3, 257, 8, 1, 80, 3), (1, 17, 2, 2, 16, 1), (2, 300, 4, 4, 64, 7),
         (1, 40, 6, 2, 32, 4)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}_L{}_Hq{}_Hkv{}_D{}_splits{}".format(*c))
def test_matches_reference(case, dtype):
    batch, length, hq, hkv, d, splits = case
    q = torch.randn(batch, hq, d).to(dtype)
    k_cache, v_cache = (torch.randn(batch, length, hkv, d).to(dtype) for _ in range(2))
    cache_seqlens = torch.randint(1, length + 1, (batch,), dtype=torch.int32)
    cache_seqlens[0] = 1  # a sequence that has only its new token
    if batch > 1:
        cache_seqlens[-1] = length  # and a full cache
    _check(q, k_cache, v_cache, cache_seqlens, splits)


def test_strided_cache_and_unaligned_rows():
    # the model preallocates a (B, max_len, Hkv, D) cache and hands over a slice: strides differ from the shape
    buffer = torch.randn(2, 96, 2, 2, 32)  # (..., 2, ...) interleaves k and v in one buffer
    k_cache, v_cache = buffer[:, :50, :, 0], buffer[:, :50, :, 1]
    assert not k_cache.is_contiguous()
    _check(torch.randn(2, 4, 32), k_cache, v_cache, torch.tensor([50, 23], dtype=torch.int32), num_splits=2)
    # head_dim 20 in fp16: 40-byte rows, not 16-byte aligned, so the kernel must not assume aligned rows
    q = torch.randn(2, 4, 20).half()
    _check(q, torch.randn(2, 30, 2, 20).half(), torch.randn(2, 30, 2, 20).half(), torch.tensor([30, 9]).int(), 3)


def test_softmax_scale_and_public_entry_point(triton_path):
    q, k_cache, v_cache = torch.randn(2, 4, 32), torch.randn(2, 33, 2, 32), torch.randn(2, 33, 2, 32)
    cache_seqlens = torch.tensor([33, 5], dtype=torch.int32)
    _check(q, k_cache, v_cache, cache_seqlens, softmax_scale=0.2)
    out = decode_attention(q, k_cache, v_cache, cache_seqlens)
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, cache_seqlens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("q_shape, k_shape, seqlens_shape, match", [
    ((2, 4, 32), (2, 10, 2, 32, 1), (2,), "must be"),
    ((2, 3, 32), (2, 10, 2, 32), (2,), "kv heads do not divide"),
    ((2, 4, 32), (2, 10, 2, 16), (2,), "head_dim"),
    ((2, 4, 32), (2, 10, 2, 32), (3,), "cache_seqlens"),
])
def test_decode_attention_shape_errors(triton_path, q_shape, k_shape, seqlens_shape, match):
    with pytest.raises(ValueError, match=match):
        decode_attention(torch.randn(q_shape), torch.randn(k_shape), torch.randn(k_shape),
                         torch.ones(seqlens_shape, dtype=torch.int32))


def test_decode_attention_mixed_dtypes_error(triton_path):
    with pytest.raises(ValueError, match="dtypes differ"):
        decode_attention(torch.randn(2, 4, 32), torch.randn(2, 10, 2, 32).half(), torch.randn(2, 10, 2, 32).half(),
                         torch.ones(2, dtype=torch.int32))


def test_decode_attention_op_under_autocast_takes_mixed_dtypes_on_both_paths():
    """A caller's own fp32 cache with a bf16 q under autocast: both paths compute as SDPA under autocast does."""
    q = torch.randn(2, 4, 16).bfloat16()
    k_cache, v_cache = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    seqlens = torch.tensor([5, 20], dtype=torch.int32)
    outs = {}
    for mode in ("torch", "triton"):
        with kernels(mode), torch.autocast("cpu", dtype=torch.bfloat16):
            outs[mode] = decode_attention(q, k_cache, v_cache, seqlens)
    assert outs["triton"].dtype == outs["torch"].dtype == torch.bfloat16
    torch.testing.assert_close(outs["triton"].float(), outs["torch"].float(), atol=2e-2, rtol=0)


def test_decode_splits_each_sequence_not_the_cache(monkeypatch):
    """A long cache (max_new_tokens sized) holding short sequences: every split program gets keys of its own
    sequence (partial sum > 0) instead of the later splits falling past the sequence and idling. The partial sums
    are read where the reduce kernel receives them."""
    dec = importlib.import_module("gmaivl_rt.kernels.decode_attention")
    real_reduce, seen = dec._decode_reduce_kernel, []

    class Recording:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: (seen.append(args[1].clone()), real_reduce[grid](*args, **kwargs))

    monkeypatch.setattr(dec, "_decode_reduce_kernel", Recording())
    block_n, splits = dec.SPLIT_CONFIGS[0][0], 4
    q, k_cache, v_cache = torch.randn(2, 4, 16), torch.randn(2, 1024, 2, 16), torch.randn(2, 1024, 2, 16)
    seqlens = torch.tensor([splits * block_n, splits * block_n + 5], dtype=torch.int32)
    out = dec._decode_attention_triton(q, k_cache, v_cache, seqlens, None, splits)
    (part_l,) = seen
    assert part_l.shape == (2, 4, splits)
    assert bool((part_l > 0).all()), part_l
    torch.testing.assert_close(out, decode_attention_reference(q, k_cache, v_cache, seqlens), atol=1e-5, rtol=0)

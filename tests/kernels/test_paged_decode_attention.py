"""Paged decode attention (Triton, interpreted on CPU) against the contiguous-cache SDPA reference: the blocks of
each sequence are gathered by hand into a (B, L, Hkv, D) cache, so the block-table indexing is checked independently.

Tolerances (max abs error vs the fp32 reference on the same, upcast, inputs; outputs are O(1)):
  fp32: 1e-5    fp16: 2e-3
"""
import pytest
import torch

from gmaivl_rt.kernels.decode_attention import decode_attention_reference

from gmaivl_rt.kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from gmaivl_rt.kernels.paged_decode_attention import _paged_decode_attention_triton

TOL = {torch.float32: 1e-5, torch.float16: 2e-3}


def _paged_case(seqlens, block_size, hq, hkv, d, dtype, spare_blocks=3):
    """A pool with each sequence's blocks scattered in shuffled order; returns the pool, tables and the
    equivalent contiguous caches."""
    g = torch.Generator().manual_seed(sum(seqlens) + block_size)
    blocks_per_seq = [-(-n // block_size) for n in seqlens]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    k_pool = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    v_pool = torch.randn(num_blocks, block_size, hkv, d, generator=g).to(dtype)
    order = torch.randperm(num_blocks, generator=g).tolist()  # blocks out of order, spare ones in between
    max_blocks = max(blocks_per_seq) + 1  # one padding column: entries past a sequence's blocks are ignored
    tables = torch.zeros(len(seqlens), max_blocks, dtype=torch.int32)
    length = max_blocks * block_size
    k_cache = torch.zeros(len(seqlens), length, hkv, d, dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    for b, n in enumerate(blocks_per_seq):
        for j in range(n):
            block = order.pop()
            tables[b, j] = block
            k_cache[b, j * block_size:(j + 1) * block_size] = k_pool[block]
            v_cache[b, j * block_size:(j + 1) * block_size] = v_pool[block]
    q = torch.randn(len(seqlens), hq, d, generator=g).to(dtype)
    return q, k_pool, v_pool, tables, torch.tensor(seqlens, dtype=torch.int32), k_cache, v_cache


# (seqlens, block_size, q_heads, kv_heads, head_dim, num_splits): ragged lengths (1, exact block multiples, one
# past a block), GQA / MHA / MQA, one split, several, more splits than positions (empty splits), automatic
CASES = [([5, 16, 33], 16, 4, 2, 32, None), ([1, 64, 65], 32, 8, 1, 16, 3), ([100, 7], 16, 4, 4, 64, 7),
         ([31], 32, 6, 2, 32, 1), ([17, 48, 3, 90], 16, 2, 2, 32, 9)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "L{}_bs{}_Hq{}_Hkv{}_D{}_splits{}".format(
    "-".join(map(str, c[0])), *c[1:]))
def test_triton_matches_contiguous_reference(case, dtype):
    seqlens, block_size, hq, hkv, d, splits = case
    q, k_pool, v_pool, tables, lens, k_cache, v_cache = _paged_case(seqlens, block_size, hq, hkv, d, dtype)
    out = _paged_decode_attention_triton(q, k_pool, v_pool, tables, lens, None, splits)
    assert out.shape == q.shape and out.dtype == q.dtype
    expected = decode_attention_reference(q.float(), k_cache.float(), v_cache.float(), lens)
    torch.testing.assert_close(out.float(), expected, atol=TOL[dtype], rtol=0)


def test_reference_and_public_entry_point(triton_path):
    q, k_pool, v_pool, tables, lens, k_cache, v_cache = _paged_case([20, 9], 16, 4, 2, 32, torch.float32)
    expected = decode_attention_reference(q, k_cache, v_cache, lens, softmax_scale=0.3)
    ref = paged_decode_attention_reference(q, k_pool, v_pool, tables, lens, softmax_scale=0.3)
    torch.testing.assert_close(ref, expected, atol=1e-6, rtol=0)
    out = paged_decode_attention(q, k_pool, v_pool, tables, lens, softmax_scale=0.3)  # GMAIVL_KERNELS=triton
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_shape_errors_name_the_inputs():
    with pytest.raises(ValueError, match="block_tables"):
        paged_decode_attention(torch.randn(2, 4, 8), torch.randn(3, 16, 2, 8), torch.randn(3, 16, 2, 8),
                               torch.zeros(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32))

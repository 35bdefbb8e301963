"""Paged decode attention: one new query token per sequence over a paged KV cache (vLLM's PagedAttention layout).

Keys and values live in one pool of fixed-size blocks per layer, (num_blocks, block_size, Hkv, D); each sequence
owns a row of `block_tables` listing its blocks in order, so position p of sequence b sits in block
block_tables[b, p // block_size] at offset p % block_size. The Triton path is flash-decoding (split along the
sequence, as `decode_attention`) with each position's K/V row found through the block table."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton
from ._spec import KernelSpec, Roofline
from .attention import launch_attrs
from .decode_attention import (_num_splits, decode_attention_reference, launch_split_decode, split_accumulators,
                               split_chunk, split_program, store_split)


def paged_decode_attention(q, k_pool, v_pool, block_tables, cache_seqlens, *, softmax_scale=None):
    """q: (B, Hq, D); k_pool, v_pool: (num_blocks, block_size, Hkv, D); block_tables: (B, max_blocks) int32, the
    blocks of each sequence in order (entries past its last block are ignored but must be valid block indices,
    e.g. 0); cache_seqlens: (B,) int32 entries per sequence (the new token's k/v already written at position
    cache_seqlens - 1). Returns (B, Hq, D) like q. Hkv must divide Hq; fp32/fp16/bf16 with fp32 accumulation;
    softmax_scale defaults to D ** -0.5."""
    if q.dim() != 3 or k_pool.dim() != 4 or k_pool.shape != v_pool.shape or block_tables.dim() != 2:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)} must be (B, Hq, D), k/v pools "
                         f"{tuple(k_pool.shape)}/{tuple(v_pool.shape)} (num_blocks, block_size, Hkv, D) and "
                         f"block_tables {tuple(block_tables.shape)} (B, max_blocks)")
    if use_triton(q, k_pool, v_pool):
        if torch.compiler.is_compiling():  # the registered op: torch.compile keeps the kernel, traces around it
            return torch.ops.gmaivl.paged_decode_attention(q, k_pool, v_pool, block_tables, cache_seqlens,
                                                           softmax_scale)
        return _paged_decode_attention_triton(q, k_pool, v_pool, block_tables, cache_seqlens, softmax_scale)
    return paged_decode_attention_reference(q, k_pool, v_pool, block_tables, cache_seqlens,
                                            softmax_scale=softmax_scale)


def paged_decode_attention_reference(q, k_pool, v_pool, block_tables, cache_seqlens, *, softmax_scale=None):
    """Gathers each sequence's blocks into a contiguous cache and runs `decode_attention_reference` on it."""
    batch, max_blocks = block_tables.shape
    block_size = k_pool.shape[1]
    tables = block_tables.to(device=q.device, dtype=torch.long).flatten()  # index_select: a faster gather on CPU
    k_cache = k_pool.index_select(0, tables).reshape(batch, max_blocks * block_size, *k_pool.shape[2:])
    v_cache = v_pool.index_select(0, tables).reshape(batch, max_blocks * block_size, *v_pool.shape[2:])
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale)


@triton.jit
def _paged_split_kernel(Q, K, V, TABLES, SEQLENS, PART_M, PART_L, PART_ACC, qk_scale,
                        stride_qb, stride_qh, stride_kn, stride_kl, stride_kh, stride_vn, stride_vl, stride_vh,
                        stride_tb, NUM_KV_HEADS, GROUP, NUM_SPLITS,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, ALIGNED: tl.constexpr,
                        UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Grid: (batch * kv_heads, NUM_SPLITS). As decode_attention's split kernel, except that the K/V rows of
    positions pos come from block TABLES[batch, pos // BLOCK_SIZE], offset pos % BLOCK_SIZE, of the pools."""
    batch, kv_head, split, lo, hi, q, heads, head_ok, d_ok = split_program(
        Q, SEQLENS, stride_qb, stride_qh, NUM_KV_HEADS, GROUP, NUM_SPLITS, HEAD_DIM, BLOCK_D, BLOCK_H, UPCAST)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    table = TABLES + batch.to(tl.int64) * stride_tb
    acc, m_i, l_i = split_accumulators(BLOCK_H, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        pos_ok = pos < hi
        block = tl.load(table + pos // BLOCK_SIZE, mask=pos_ok, other=0).to(tl.int64)
        offset = pos % BLOCK_SIZE
        k_ptrs = K + (block * stride_kn + offset * stride_kl + kv_head * stride_kh)[:, None] + offs_d[None, :]
        v_ptrs = V + (block * stride_vn + offset * stride_vl + kv_head * stride_vh)[:, None] + offs_d[None, :]
        acc, m_i, l_i = split_chunk(q, k_ptrs, v_ptrs, pos_ok, d_ok, acc, m_i, l_i, qk_scale, ALIGNED, UPCAST,
                                    PRECISION)
    store_split(PART_M, PART_L, PART_ACC, batch, heads, split, m_i, l_i, acc, head_ok, d_ok, NUM_KV_HEADS, GROUP,
                NUM_SPLITS, HEAD_DIM, BLOCK_D)


# (BLOCK_N, num_warps, num_stages); the first is the default (interpreter / report). BLOCK_N spans whole or part
# blocks: each position finds its own block, so any BLOCK_N works with any block size.
SPLIT_CONFIGS = [(64, 4, 2), (32, 4, 2), (128, 4, 2), (64, 8, 3)]


def _split_triton_configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in SPLIT_CONFIGS]


_paged_split_tuned = triton.autotune(_split_triton_configs(), key=["HEAD_DIM", "BLOCK_H", "BLOCK_SIZE",
                                                                    "PRECISION"])(_paged_split_kernel)


def _paged_decode_attention_triton(q, k_pool, v_pool, block_tables, cache_seqlens, softmax_scale,
                                   num_splits=None):
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_pool.shape[1], k_pool.shape[2]
    if num_heads % num_kv_heads or k_pool.shape[3] != head_dim or block_tables.shape[0] != batch:
        raise ValueError(f"paged_decode_attention: q {tuple(q.shape)}, pools {tuple(k_pool.shape)} and "
                         f"block_tables {tuple(block_tables.shape)} disagree on batch or head_dim, or kv heads do "
                         "not divide q heads")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"paged_decode_attention: cache_seqlens has shape {tuple(cache_seqlens.shape)}, "
                         f"expected ({batch},)")
    if not q.dtype == k_pool.dtype == v_pool.dtype:
        raise ValueError(f"paged_decode_attention: q, k_pool, v_pool dtypes differ ({q.dtype}, {k_pool.dtype}, "
                         f"{v_pool.dtype}); cast them to one dtype first")
    if head_dim > 256 or block_size & (block_size - 1):
        raise ValueError(f"paged_decode_attention: head_dim {head_dim} must be <= 256 and block_size "
                         f"{block_size} a power of two for the Triton kernel")
    q, k_pool, v_pool = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_pool, v_pool))
    tables = block_tables.to(device=q.device, dtype=torch.int32).contiguous()
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    max_len = tables.shape[1] * block_size
    splits = num_splits or _num_splits(batch, num_kv_heads, max_len, q.device)
    return launch_split_decode((_paged_split_kernel, _paged_split_tuned, SPLIT_CONFIGS), q, k_pool, v_pool,
                               (tables, seqlens), (*k_pool.stride()[:3], *v_pool.stride()[:3], tables.stride(0)),
                               num_kv_heads, splits, softmax_scale,
                               BLOCK_SIZE=block_size)


@torch.library.custom_op("gmaivl::paged_decode_attention", mutates_args=())
def _paged_decode_attention_op(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                               block_tables: torch.Tensor, cache_seqlens: torch.Tensor,
                               softmax_scale: float | None) -> torch.Tensor:
    """The Triton kernels as a torch.library op, for compiled graphs."""
    return _paged_decode_attention_triton(q, k_pool, v_pool, block_tables, cache_seqlens, softmax_scale)


@_paged_decode_attention_op.register_fake
def _(q, k_pool, v_pool, block_tables, cache_seqlens, softmax_scale):
    return torch.empty_like(q)


@torch.library.custom_op("gmaivl::store_kv", mutates_args=("pool",))
def store_kv(pool: torch.Tensor, index: torch.Tensor, kv: torch.Tensor) -> None:
    """pool: (num_blocks, block_size, Hkv, D); index: (T,) int64 slots in the pool seen as (blocks * block_size,
    Hkv, D); kv: (T, Hkv, D). Writes kv there, in place. An op of its own so a compiled graph writes the few new
    rows in place instead of copying the whole pool."""
    pool.view(-1, *pool.shape[2:]).index_copy_(0, index, kv.to(pool.dtype))


@store_kv.register_fake
def _(pool, index, kv):
    return None


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness report (the reduce kernel is decode_attention's and reported there)
# ----------------------------------------------------------------------------------------------------------------
REPORT_SHAPE = dict(batch=16, cache_len=2048, q_heads=32, kv_heads=8, head_dim=128, block_size=16)
REPORT_SPLITS = 3  # what _num_splits picks for this shape on a 132-SM H100 (2 * 132 / (16 * 8), rounded up)


def report_specs(dtype: str = "bf16") -> list[KernelSpec]:
    """Every split-kernel config paged decode attention can launch, for the named shape, with `dtype` pointers."""
    b, length, hq, hkv, d, bs = (REPORT_SHAPE[k] for k in ("batch", "cache_len", "q_heads", "kv_heads", "head_dim",
                                                           "block_size"))
    esize = 4 if dtype == "fp32" else 2
    name = f"B={b} L={length} Hq={hq} Hkv={hkv} D={d} block={bs} {dtype}"
    roof = Roofline(f"{name} paged decode splits={REPORT_SPLITS}", 4.0 * b * hq * length * d,
                    esize * (2.0 * b * length * hkv * d + b * hq * d) + 4.0 * b * length / bs
                    + 4.0 * b * hq * REPORT_SPLITS * (d + 2))
    ptr = f"*{dtype}"
    signature = {
        "Q": ptr, "K": ptr, "V": ptr, "TABLES": "*i32", "SEQLENS": "*i32", "PART_M": "*fp32", "PART_L": "*fp32",
        "PART_ACC": "*fp32", "qk_scale": "fp32",
        **dict.fromkeys(("stride_qb", "stride_qh", "stride_kn", "stride_kl", "stride_kh", "stride_vn", "stride_vl",
                         "stride_vh", "stride_tb"), "i32"),
        "NUM_KV_HEADS": "i32", "GROUP": "i32", "NUM_SPLITS": "i32",
        **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_H", "BLOCK_N", "BLOCK_SIZE", "ALIGNED", "UPCAST",
                         "PRECISION"), "constexpr"),
    }
    base = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)),
                BLOCK_SIZE=bs, ALIGNED=True, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
    int_values = {"stride_qb": hq * d, "stride_qh": d, "stride_kn": bs * hkv * d, "stride_kl": hkv * d,
                  "stride_kh": d, "stride_vn": bs * hkv * d, "stride_vl": hkv * d, "stride_vh": d,
                  "stride_tb": length // bs, "NUM_KV_HEADS": hkv, "GROUP": hq // hkv, "NUM_SPLITS": REPORT_SPLITS}
    attrs = launch_attrs(_paged_split_kernel, signature, int_values)
    return [KernelSpec(kernel="paged_decode_attention_split", fn=_paged_split_kernel, signature=signature,
                       constexprs={**base, "BLOCK_N": bn}, num_warps=w, num_stages=st, default=i == 0, uses_dot=True,
                       roofline=roof, extra={"attrs": attrs})
            for i, (bn, w, st) in enumerate(SPLIT_CONFIGS)]

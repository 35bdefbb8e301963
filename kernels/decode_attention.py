"""Decode attention: one new query token per sequence over a KV cache (flash-decoding split along the cache)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import config_forced, interpreting, pick_config, unsupported_head_dim, use_triton
from ._spec import KernelSpec, Roofline
from .attention import launch_attrs, online_softmax_step
from .projector import autocast_operands


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None):
    """q: (B, Hq, D); k_cache, v_cache: (B, L, Hkv, D); cache_seqlens: (B,) int32, valid entries per
    sequence (the new token's k/v already written at position cache_seqlens - 1). Returns (B, Hq, D).
    Hkv must divide Hq; fp32/fp16/bf16 with fp32 accumulation. The caches may be strided views (e.g. a slice of a
    preallocated buffer) as long as the head dim is contiguous. softmax_scale defaults to D ** -0.5.
    The Triton path splits each cache into chunks (flash-decoding) so a batch of one still fills the GPU."""
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} must be (B, Hq, D) and k/v caches "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} (B, L, Hkv, D)")
    if use_triton(q, k_cache, v_cache, gemm=True, head_dim=q.shape[-1]):
        # under autocast, the dtypes SDPA (the reference) would compute in; a no-op when the cache already holds
        # the activation dtype (GMAIVL.new_cache)
        q, k_cache, v_cache = autocast_operands(q, k_cache, v_cache)
        return _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale)
    return decode_attention_reference(q, k_cache, v_cache, cache_seqlens, softmax_scale=softmax_scale)


def decode_attention_reference(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None):
    B, L = k_cache.shape[:2]
    valid = torch.arange(L, device=q.device)[None, :] < cache_seqlens.to(q.device)[:, None]  # (B, L)
    out = F.scaled_dot_product_attention(
        q[:, :, None, :], k_cache.transpose(1, 2), v_cache.transpose(1, 2),
        attn_mask=valid[:, None, None, :], scale=softmax_scale, enable_gqa=q.shape[1] != k_cache.shape[2])
    return out[:, :, 0, :]


_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # finite running-max start: an empty split then gives weight exp2(-1e30 - m) = 0


@triton.jit
def split_program(Q, SEQLENS, stride_qb, stride_qh, NUM_KV_HEADS, GROUP, NUM_SPLITS, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr):
    """The start of a split program (grid (batch * kv_heads, NUM_SPLITS)): which sequence, kv head and cache chunk
    [lo, hi) it covers, and the GROUP q heads sharing that kv head, loaded as a (BLOCK_H, BLOCK_D) tile. Each
    sequence splits its own length (as SGLang: kv_len_per_split = cdiv(seq_len, num_splits)), so a short sequence in
    a long cache still spreads over every split instead of leaving most split programs empty."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    batch = pid_bh // NUM_KV_HEADS
    kv_head = pid_bh % NUM_KV_HEADS
    seqlen = tl.load(SEQLENS + batch)
    split_len = tl.cdiv(seqlen, NUM_SPLITS)
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seqlen)
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    head_ok = offs_h < GROUP
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + batch.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=head_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    return batch, kv_head, split, lo, hi, q, heads, head_ok, d_ok


@triton.jit
def split_accumulators(BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """A split's empty running softmax: (acc, m_i, l_i) for BLOCK_H q rows, m_i starting at a finite minimum."""
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    m_i = tl.full([BLOCK_H], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    return acc, m_i, l_i


@triton.jit
def split_chunk(q, k_ptrs, v_ptrs, pos_ok, d_ok, acc, m_i, l_i, qk_scale, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
                PRECISION: tl.constexpr):
    """Load one chunk of keys/values (BLOCK_N rows of BLOCK_D, at k_ptrs / v_ptrs) and fold it into the running
    softmax; pos_ok masks positions past the chunk's end."""
    mask = pos_ok[:, None] & d_ok[None, :]
    if ALIGNED:
        k_ptrs = tl.multiple_of(k_ptrs, [1, 16])
        v_ptrs = tl.multiple_of(v_ptrs, [1, 16])
    k = tl.load(k_ptrs, mask=mask, other=0.0)
    v = tl.load(v_ptrs, mask=mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    s = tl.where(pos_ok[None, :], s, float("-inf"))
    return online_softmax_step(acc, m_i, l_i, s, v, PRECISION)


@triton.jit
def store_split(PART_M, PART_L, PART_ACC, batch, heads, split, m_i, l_i, acc, head_ok, d_ok, NUM_KV_HEADS, GROUP,
                NUM_SPLITS, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Write a split's running max, sum and unnormalised output for the reduce kernel."""
    offs_d = tl.arange(0, BLOCK_D)
    row = (batch * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split  # partials laid out (B, Hq, NUM_SPLITS, ...)
    tl.store(PART_M + row, m_i, mask=head_ok)
    tl.store(PART_L + row, l_i, mask=head_ok)
    tl.store(PART_ACC + row[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :], acc,
             mask=head_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_split_kernel(Q, K, V, SEQLENS, PART_M, PART_L, PART_ACC, qk_scale,
                         stride_qb, stride_qh, stride_kb, stride_kl, stride_kh, stride_vb, stride_vl, stride_vh,
                         NUM_KV_HEADS, GROUP, NUM_SPLITS,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr,
                         BLOCK_N: tl.constexpr, ALIGNED: tl.constexpr, UPCAST: tl.constexpr,
                         PRECISION: tl.constexpr):
    """Grid: (batch * kv_heads, NUM_SPLITS). One program: the GROUP q heads sharing one kv head (padded to BLOCK_H
    rows so tl.dot has >= 16 rows) against one chunk (a NUM_SPLITS-th) of that sequence's cache. Writes the chunk's
    running max, sum and unnormalised output (log2 units) for the reduce kernel. ALIGNED: every cache row starts
    16-byte aligned (the launcher checks), which lets loads vectorise without argument specialisation."""
    batch, kv_head, split, lo, hi, q, heads, head_ok, d_ok = split_program(
        Q, SEQLENS, stride_qb, stride_qh, NUM_KV_HEADS, GROUP, NUM_SPLITS, HEAD_DIM, BLOCK_D, BLOCK_H, UPCAST)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    k_base = K + batch.to(tl.int64) * stride_kb + kv_head * stride_kh
    v_base = V + batch.to(tl.int64) * stride_vb + kv_head * stride_vh
    acc, m_i, l_i = split_accumulators(BLOCK_H, BLOCK_D)
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        pos_ok = pos < hi
        k_ptrs = k_base + pos[:, None] * stride_kl + offs_d[None, :]
        v_ptrs = v_base + pos[:, None] * stride_vl + offs_d[None, :]
        acc, m_i, l_i = split_chunk(q, k_ptrs, v_ptrs, pos_ok, d_ok, acc, m_i, l_i, qk_scale, ALIGNED, UPCAST,
                                    PRECISION)
    store_split(PART_M, PART_L, PART_ACC, batch, heads, split, m_i, l_i, acc, head_ok, d_ok, NUM_KV_HEADS, GROUP,
                NUM_SPLITS, HEAD_DIM, BLOCK_D)


@triton.jit
def _decode_reduce_kernel(PART_M, PART_L, PART_ACC, Out, stride_ob, stride_oh, NUM_HEADS, NUM_SPLITS,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    """Grid: (batch * q_heads,). Combines the splits' partial softmaxes: out = sum_s w_s acc_s / sum_s w_s l_s with
    w_s = exp2(m_s - max m). A sequence with no cache entries gives 0."""
    pid = tl.program_id(0)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    rows = pid * NUM_SPLITS + offs_s
    m = tl.load(PART_M + rows, mask=s_ok, other=_NEG_BIG)
    l = tl.load(PART_L + rows, mask=s_ok, other=0.0)
    acc = tl.load(PART_ACC + rows[:, None].to(tl.int64) * HEAD_DIM + offs_d[None, :],
                  mask=s_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    w = tl.exp2(m - tl.max(m, 0))
    total = tl.sum(w * l, 0)
    out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0.0, total, 1.0)
    batch = pid // NUM_HEADS
    head = pid % NUM_HEADS
    tl.store(Out + batch.to(tl.int64) * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


# (BLOCK_N, num_warps, num_stages); the first is the default (interpreter / report). All compile for sm_80 and
# sm_90 at head dim 128 (bf16) without spills, with mma on both (16 q rows are below wgmma's 64-row minimum).
SPLIT_CONFIGS = [(64, 4, 3), (128, 4, 3), (64, 4, 4), (32, 2, 4), (128, 8, 3)]
REDUCE_WARPS = 4
MAX_SPLITS = 64


def _split_triton_configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s) for bn, w, s in SPLIT_CONFIGS]


_decode_split_tuned = triton.autotune(_split_triton_configs(), key=["HEAD_DIM", "BLOCK_H", "PRECISION"])(
    _decode_split_kernel)


def _num_splits(batch, kv_heads, cache_len, device):
    """Enough (batch, kv head, split) programs to cover the GPU about twice; a few under the interpreter."""
    if device.type == "cuda":
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 4
    splits = triton.cdiv(target, batch * kv_heads)
    return max(1, min(splits, MAX_SPLITS, triton.cdiv(cache_len, 64)))


def _rows_aligned(t):
    """Every row along the last dim starts on a 16-byte boundary (base pointer and all outer strides)."""
    return t.data_ptr() % 16 == 0 and all(stride * t.element_size() % 16 == 0 for stride in t.stride()[:-1])


def _decode_attention_triton(q, k_cache, v_cache, cache_seqlens, softmax_scale, num_splits=None):
    batch, num_heads, head_dim = q.shape
    cache_len, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if num_heads % num_kv_heads or k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)} disagree on "
                         "batch or head_dim, or kv heads do not divide q heads")
    if cache_seqlens.shape != (batch,):
        raise ValueError(f"decode_attention: cache_seqlens has shape {tuple(cache_seqlens.shape)}, expected ({batch},)")
    if not q.dtype == k_cache.dtype == v_cache.dtype:
        raise ValueError(f"decode_attention: q, k_cache, v_cache dtypes differ ({q.dtype}, {k_cache.dtype}, "
                         f"{v_cache.dtype}); cast them to one dtype first")
    if unsupported_head_dim(head_dim):
        raise ValueError(f"decode_attention: {unsupported_head_dim(head_dim)}")
    # The kernels index the last dim with stride 1; anything else is copied.
    q, k_cache, v_cache = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cache, v_cache))
    seqlens = cache_seqlens.to(device=q.device, dtype=torch.int32)
    splits = num_splits or _num_splits(batch, num_kv_heads, cache_len, q.device)
    return launch_split_decode((_decode_split_kernel, _decode_split_tuned, SPLIT_CONFIGS), q, k_cache, v_cache,
                               (seqlens,), (*k_cache.stride()[:3], *v_cache.stride()[:3]), num_kv_heads, splits,
                               softmax_scale)


def launch_split_decode(kernels, q, k, v, lead_args, stride_args, num_kv_heads, splits, softmax_scale, **flags):
    """Launch a split kernel (`kernels`: (plain kernel, autotuned kernel, configs)) over grid (batch * kv_heads,
    splits) and the reduce kernel; returns the output like q (B, Hq, D). The split kernel takes (Q, K, V,
    *lead_args, PART_M, PART_L, PART_ACC, qk_scale, stride_qb, stride_qh, *stride_args, NUM_KV_HEADS, GROUP,
    NUM_SPLITS) and the constexprs here plus `flags`; each sequence splits its own length (`split_program`)."""
    split_kernel, split_tuned, configs = kernels
    batch, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    part_m = torch.empty((batch, num_heads, splits), device=q.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty((batch, num_heads, splits, head_dim), device=q.device, dtype=torch.float32)
    out = torch.empty_like(q)
    flags.update(HEAD_DIM=head_dim, ALIGNED=all(_rows_aligned(t) for t in (k, v)),
                 BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
                 BLOCK_H=max(16, triton.next_power_of_2(group)),
                 UPCAST=interpreting() and q.dtype == torch.bfloat16,  # interpreter cannot compute on bf16
                 PRECISION="ieee" if q.dtype == torch.float32 else "tf32")
    args = (q, k, v, *lead_args, part_m, part_l, part_acc, scale * _LOG2E, q.stride(0), q.stride(1), *stride_args,
            num_kv_heads, group, splits)
    grid = (batch * num_kv_heads, splits)
    if q.is_cuda and not config_forced(configs):
        split_tuned[grid](*args, **flags)
    else:
        block_n, warps, stages = pick_config(configs)
        split_kernel[grid](*args, **flags, BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    _decode_reduce_kernel[(batch * num_heads,)](
        part_m, part_l, part_acc, out, out.stride(0), out.stride(1), num_heads, splits, HEAD_DIM=head_dim,
        BLOCK_D=flags["BLOCK_D"], BLOCK_S=max(2, triton.next_power_of_2(splits)), num_warps=REDUCE_WARPS)
    return out


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness report
# ----------------------------------------------------------------------------------------------------------------
REPORT_SHAPE = dict(batch=1, cache_len=8192, q_heads=32, kv_heads=8, head_dim=128)
REPORT_SPLITS = 32  # what _num_splits picks for this shape on a 132-SM H100 (2 * 132 / 8 programs, rounded up)


def report_specs(dtype: str = "bf16") -> list[KernelSpec]:
    """Every (kernel, config) decode attention can launch, for the named shape, with `dtype` pointers."""
    b, length, hq, hkv, d = (REPORT_SHAPE[k] for k in ("batch", "cache_len", "q_heads", "kv_heads", "head_dim"))
    name = f"B={b} L={length} Hq={hq} Hkv={hkv} D={d} {dtype}"
    esize = 4 if dtype == "fp32" else 2
    partial_bytes = 4.0 * b * hq * REPORT_SPLITS * (d + 2)
    split_roof = Roofline(f"{name} decode splits={REPORT_SPLITS}", 4.0 * b * hq * length * d,
                          esize * (2.0 * b * length * hkv * d + b * hq * d) + partial_bytes)
    reduce_roof = Roofline(f"{name} decode reduce", 3.0 * b * hq * REPORT_SPLITS * d,
                           partial_bytes + esize * b * hq * d)
    ptr = f"*{dtype}"
    split_signature = {
        "Q": ptr, "K": ptr, "V": ptr, "SEQLENS": "*i32", "PART_M": "*fp32", "PART_L": "*fp32", "PART_ACC": "*fp32",
        "qk_scale": "fp32", **dict.fromkeys(("stride_qb", "stride_qh", "stride_kb", "stride_kl", "stride_kh",
                                             "stride_vb", "stride_vl", "stride_vh"), "i32"),
        "NUM_KV_HEADS": "i32", "GROUP": "i32", "NUM_SPLITS": "i32",
        **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_H", "BLOCK_N", "ALIGNED", "UPCAST", "PRECISION"),
                        "constexpr"),
    }
    base = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), BLOCK_H=max(16, triton.next_power_of_2(hq // hkv)),
                ALIGNED=True, UPCAST=False, PRECISION="ieee" if dtype == "fp32" else "tf32")
    # integer arguments at the report shape (contiguous (B, L, Hkv, D) caches), for the launch specialisation
    int_values = {"stride_qb": hq * d, "stride_qh": d, "stride_kb": length * hkv * d, "stride_kl": hkv * d,
                  "stride_kh": d, "NUM_KV_HEADS": hkv, "GROUP": hq // hkv, "NUM_SPLITS": REPORT_SPLITS,
                  "stride_ob": hq * d, "stride_oh": d, "NUM_HEADS": hq}
    int_values.update(stride_vb=int_values["stride_kb"], stride_vl=int_values["stride_kl"], stride_vh=d)
    split_attrs = launch_attrs(_decode_split_kernel, split_signature, int_values)
    specs = [KernelSpec(kernel="decode_attention_split", fn=_decode_split_kernel, signature=split_signature,
                        constexprs={**base, "BLOCK_N": bn}, num_warps=w, num_stages=st, default=i == 0,
                        uses_dot=True, roofline=split_roof, extra={"attrs": split_attrs})
             for i, (bn, w, st) in enumerate(SPLIT_CONFIGS)]
    reduce_signature = {"PART_M": "*fp32", "PART_L": "*fp32", "PART_ACC": "*fp32", "Out": ptr, "stride_ob": "i32",
                        "stride_oh": "i32", "NUM_HEADS": "i32", "NUM_SPLITS": "i32"}
    specs.append(KernelSpec(
        kernel="decode_attention_reduce", fn=_decode_reduce_kernel,
        signature={**reduce_signature, **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_S"), "constexpr")},
        extra={"attrs": launch_attrs(_decode_reduce_kernel, reduce_signature, int_values)},
        constexprs={"HEAD_DIM": d, "BLOCK_D": triton.next_power_of_2(d),
                    "BLOCK_S": triton.next_power_of_2(REPORT_SPLITS)},
        num_warps=REDUCE_WARPS, default=True, uses_dot=False, roofline=reduce_roof))
    return specs

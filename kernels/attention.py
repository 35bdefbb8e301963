"""Fused attention (FlashAttention-2 algorithm), padded and packed variable-length layouts.

Layouts:
- padded: q (batch, seq, heads, head_dim), k/v (batch, seq_k, kv_heads, head_dim)
- packed: q (total_tokens, heads, head_dim) with int32 `cu_seqlens` (n + 1,): block-diagonal attention.
k/v heads must divide q heads (grouped- and multi-query attention). Returns the layout it was given.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._dispatch import MAX_HEAD_DIM, config_forced, interpreting, pick_config, unsupported_head_dim, use_triton
from ._spec import KernelSpec, Roofline


def attention(q, k, v, *, causal=False, softmax_scale=None, cu_seqlens=None, max_seqlen=None):
    """Scaled dot-product attention.

    q: (B, S, Hq, D) or (T, Hq, D) with cu_seqlens; k, v: same layout with Hkv heads, Hq % Hkv == 0.
    fp32/fp16/bf16; accumulation in fp32. Returns a tensor shaped and typed like q.
    causal: query i sees keys j <= i of its own sequence (top-left aligned, as SDPA's is_causal).
    softmax_scale: defaults to D ** -0.5.
    cu_seqlens: int32 (n + 1,) sequence boundaries into T (block-diagonal attention; empty sequences allowed).
    max_seqlen: the longest sequence in cu_seqlens, sizing the Triton grid; computed (a device sync) when None.
    The Triton path (FlashAttention-2, differentiable) supports head dims up to 128 (multiples of 8 load fastest);
    larger ones take the reference under GMAIVL_KERNELS=auto and are refused under GMAIVL_KERNELS=triton.
    """
    _check_shapes(q, k, v, cu_seqlens)
    if use_triton(q, k, v, gemm=True, head_dim=q.shape[-1]):
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
    out = torch.zeros_like(q)  # rows past cu_seqlens[-1] belong to no sequence: 0, as on the Triton path
    for s, e in zip(bounds[:-1], bounds[1:]):
        if e > s:
            out[s:e] = _sdpa(q[None, s:e], k[None, s:e], v[None, s:e], causal, softmax_scale)[0]
    return out


# ----------------------------------------------------------------------------------------------------------------
# Triton kernels. Both layouts run as "packed": a padded (B, S, H, D) tensor is the packed buffer (B*S, H, D) with
# cu_seqlens = [0, S, 2S, ...]. q and k get separate cu_seqlens so padded cross-attention (Sq != Sk) works too.
# Scores are kept in log2 units (scale * log2(e) folded in) so the softmax uses exp2. LSE is saved per (head, token)
# in those units for the backward pass.
# ----------------------------------------------------------------------------------------------------------------
_LOG2E = 1.4426950408889634
# finite "minus infinity" for the running max, so fully masked rows never give inf - inf
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _tile_ptrs(base, offsets, HEAD_DIM: tl.constexpr):
    """base + offsets of a (rows, head_dim) tile, telling the compiler each row starts 16-byte aligned so loads are
    vectorised even when compiled ahead of time without argument specialisation. True because the launcher passes
    16-byte-aligned contiguous buffers and a row is a multiple of 16 bytes when head_dim % 8 == 0. (The hint must sit
    on the add itself: on a function argument it is dropped.)"""
    if HEAD_DIM % 8 == 0:
        ptrs = tl.multiple_of(base + offsets, [1, 16])
    else:
        ptrs = base + offsets
    return ptrs


@triton.jit
def _load_tile(base, offsets, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
               CHECK_ROWS: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; masks only what can be out of range (keeps full-width loads vectorised)."""
    ptrs = _tile_ptrs(base, offsets, HEAD_DIM)
    if CHECK_ROWS:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        if HEAD_DIM == BLOCK_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(base, offsets, x, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    ptrs = _tile_ptrs(base, offsets, HEAD_DIM)
    if HEAD_DIM == BLOCK_D:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=rows[:, None] < n_rows)
    else:
        tl.store(ptrs, x.to(ptrs.dtype.element_ty), mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _seq_bounds(CU, seq):
    start = tl.load(CU + seq)
    return start.to(tl.int64), tl.load(CU + seq + 1) - start


@triton.jit
def online_softmax_step(acc, m_i, l_i, s, v, PRECISION: tl.constexpr):
    """Fold one block of scores s (rows x keys, log2 units, -inf where masked) and its values v into the running
    max m_i, sum l_i and unnormalised output acc (FlashAttention's rescaling)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _q_program(CU_Q, CU_K, NUM_HEADS, GROUP):
    """Decode a (seq * NUM_HEADS + head, q block) program: its head, kv head and both sequences' bounds. The
    (sequence, head) pairs sit on grid axis 0, which may be 2**31 - 1 long (axis 1 stops at 65535)."""
    pid_bh = tl.program_id(0)
    seq = pid_bh // NUM_HEADS
    head = pid_bh % NUM_HEADS
    start_q, len_q = _seq_bounds(CU_Q, seq)
    start_k, len_k = _seq_bounds(CU_K, seq)
    return head, head // GROUP, start_q, len_q, start_k, len_k


@triton.jit
def _q_block(BLOCK_M: tl.constexpr):
    """This program's q block along grid axis 1, last block first: under a causal mask the late blocks see the most
    keys, so launching them first keeps the tail of the grid short."""
    return tl.num_programs(1) - 1 - tl.program_id(1)


@triton.jit
def _key_range(start_m, len_k, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    """Key blocks a q block starting at start_m visits: [0, full_hi) need no mask (wholly before the diagonal and
    inside the sequence), [full_hi, hi) do."""
    if CAUSAL:
        hi = tl.minimum(len_k, start_m + BLOCK_M)
        full_hi = tl.minimum(start_m, len_k) // BLOCK_N * BLOCK_N
    else:
        hi = len_k
        full_hi = len_k // BLOCK_N * BLOCK_N
    return full_hi, hi


@triton.jit
def _load_kv_block(k_base, v_base, kv_stride, cols, len_k, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                   MASKED: tl.constexpr, UPCAST: tl.constexpr):
    """k and v tiles (BLOCK_N, BLOCK_D) of key rows `cols`; fp32 when UPCAST (the interpreter cannot do bf16 math)."""
    kv_off = cols[:, None] * kv_stride + offs_d[None, :]
    k = _load_tile(k_base, kv_off, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    v = _load_tile(v_base, kv_off, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, MASKED)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return k, v


@triton.jit
def _key_visible(rows, cols, len_k, CAUSAL: tl.constexpr):
    """(BLOCK_M, BLOCK_N) mask: key j is visible to query i iff j < len_k and, when causal, j <= i; one compare
    against min(i, len_k - 1)."""
    if CAUSAL:
        last_visible = tl.minimum(rows, len_k - 1)
    else:
        last_visible = tl.zeros_like(rows) + (len_k - 1)
    return cols[None, :] <= last_visible[:, None]


@triton.jit
def _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, kv_stride, rows, lo, hi, len_k, offs_d, qk_scale,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                    CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi). MASKED blocks may cross the sequence end or the causal diagonal."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv_block(k_base, v_base, kv_stride, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        if MASKED:
            valid = _key_visible(rows, cols, len_k, CAUSAL)
            s = tl.where(valid, s, float("-inf"))
        acc, m_i, l_i = online_softmax_step(acc, m_i, l_i, s, v, PRECISION)
    return acc, m_i, l_i


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, LSE, CU_Q, CU_K, qk_scale, NUM_HEADS, GROUP, total_q,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Grid: (n_seqs * NUM_HEADS, cdiv(max_seqlen_q, BLOCK_M)). One program: one q block of one head."""
    pid_m = _q_block(BLOCK_M)
    head, kv_head, start_q, len_q, start_k, len_k = _q_program(CU_Q, CU_K, NUM_HEADS, GROUP)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    q_stride = NUM_HEADS * HEAD_DIM
    kv_stride = (NUM_HEADS // GROUP) * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    # 64-bit sequence/head offset on the scalar base, 32-bit offsets within the tile (fewer live registers)
    q_off = rows[:, None] * q_stride + offs_d[None, :]
    q = _load_tile(Q + start_q * q_stride + head * HEAD_DIM, q_off, rows, len_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = K + start_k * kv_stride + kv_head * HEAD_DIM
    v_base = V + start_k * kv_stride + kv_head * HEAD_DIM

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, hi = _key_range(start_m, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, kv_stride, rows, 0, full_hi, len_k, offs_d,
                                    qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    acc, m_i, l_i = _attn_fwd_inner(acc, m_i, l_i, q, k_base, v_base, kv_stride, rows, full_hi, hi, len_k, offs_d,
                                    qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    has_keys = l_i > 0.0  # a row with no visible key (empty k sequence) gives 0 and an LSE of +inf
    acc = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    _store_tile(Out + start_q * q_stride + head * HEAD_DIM, q_off, acc, rows, len_q, offs_d, HEAD_DIM, BLOCK_D)
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + head * total_q + start_q + rows, lse, mask=rows < len_q)


@triton.jit
def _attn_bwd_delta_kernel(Out, DO, DELTA, total_q, NUM_HEADS,
                           HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] (fp32). Grid: (cdiv(total_q, BLOCK_M), NUM_HEADS)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    head = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    off = rows[:, None].to(tl.int64) * (NUM_HEADS * HEAD_DIM) + head * HEAD_DIM + offs_d[None, :]
    o = _load_tile(Out, off, rows, total_q, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    do = _load_tile(DO, off, rows, total_q, offs_d, HEAD_DIM, BLOCK_D, True).to(tl.float32)
    tl.store(DELTA + head * total_q + rows, tl.sum(o * do, 1), mask=rows < total_q)


@triton.jit
def _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_stride, cols, lo, hi, len_q,
                         offs_d, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                         CAUSAL_MASK: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Accumulate dk, dv of one key block over q blocks [lo, hi), working on transposed scores (keys x queries).
    Padding q rows load LSE = +inf, so their probabilities are exactly 0 without a mask."""
    offs_m = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        q_off = rows[:, None] * q_stride + offs_d[None, :]
        q = _load_tile(q_base, q_off, rows, len_q, offs_d, HEAD_DIM, BLOCK_D, True)
        do = _load_tile(do_base, q_off, rows, len_q, offs_d, HEAD_DIM, BLOCK_D, True)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse = tl.load(lse_base + rows, mask=rows < len_q, other=float("inf"))
        delta = tl.load(delta_base + rows, mask=rows < len_q, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse[None, :])
        if CAUSAL_MASK:
            p_t = tl.where(cols[:, None] <= rows[None, :], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale, NUM_HEADS, GROUP, total_q,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr,
                          PRECISION: tl.constexpr):
    """Grid: (n_seqs * NUM_HEADS, cdiv(max_seqlen_k, BLOCK_N)). One program: one key block's dk, dv as seen by one
    q head. DK, DV are (total_k, NUM_HEADS, head_dim), one slot per q head: the GROUP q heads sharing a kv head run
    in parallel (no atomics) and the launcher sums their slots, as FlashAttention-2 does (with GROUP == 1 they are
    dk, dv themselves)."""
    head, kv_head, start_q, len_q, start_k, len_k = _q_program(CU_Q, CU_K, NUM_HEADS, GROUP)
    start_n = tl.program_id(1) * BLOCK_N
    if start_n >= len_k:
        return
    q_stride = NUM_HEADS * HEAD_DIM
    kv_stride = (NUM_HEADS // GROUP) * HEAD_DIM
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_base = start_k * kv_stride + kv_head * HEAD_DIM
    k, v = _load_kv_block(K + kv_base, V + kv_base, kv_stride, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, True, UPCAST)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if CAUSAL:  # q blocks touching the diagonal need the causal mask; later ones see the whole key block
        lo = start_n // BLOCK_M * BLOCK_M
        full_lo = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, tl.maximum(len_q, lo))
    else:
        lo = 0
        full_lo = 0
    q_base = Q + start_q * q_stride + head * HEAD_DIM
    do_base = DO + start_q * q_stride + head * HEAD_DIM
    lse_base = LSE + head * total_q + start_q
    delta_base = DELTA + head * total_q + start_q
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_stride, cols, lo, full_lo,
                                  len_q, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, True, UPCAST, PRECISION)
    dk, dv = _attn_bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, q_stride, cols, full_lo,
                                  len_q, len_q, offs_d, qk_scale, HEAD_DIM, BLOCK_D, BLOCK_M, False, UPCAST, PRECISION)
    out_base = start_k * q_stride + head * HEAD_DIM
    out_off = cols[:, None] * q_stride + offs_d[None, :]
    _store_tile(DK + out_base, out_off, dk * sm_scale, cols, len_k, offs_d, HEAD_DIM, BLOCK_D)
    _store_tile(DV + out_base, out_off, dv, cols, len_k, offs_d, HEAD_DIM, BLOCK_D)


@triton.jit
def _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kv_stride, rows, lo, hi, len_k, offs_d, qk_scale,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
                       CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        k, v = _load_kv_block(k_base, v_base, kv_stride, cols, len_k, offs_d, HEAD_DIM, BLOCK_D, MASKED, UPCAST)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse[:, None])
        if MASKED:
            valid = _key_visible(rows, cols, len_k, CAUSAL)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K, qk_scale, sm_scale, NUM_HEADS, GROUP, total_q,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """Grid: (n_seqs * NUM_HEADS, cdiv(max_seqlen_q, BLOCK_M)). One program: dq of one q block of one head."""
    pid_m = _q_block(BLOCK_M)
    head, kv_head, start_q, len_q, start_k, len_k = _q_program(CU_Q, CU_K, NUM_HEADS, GROUP)
    start_m = pid_m * BLOCK_M
    if start_m >= len_q:
        return
    q_stride = NUM_HEADS * HEAD_DIM
    kv_stride = (NUM_HEADS // GROUP) * HEAD_DIM
    rows = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = start_q * q_stride + head * HEAD_DIM
    q_off = rows[:, None] * q_stride + offs_d[None, :]
    q = _load_tile(Q + q_base, q_off, rows, len_q, offs_d, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + q_base, q_off, rows, len_q, offs_d, HEAD_DIM, BLOCK_D, True)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + head * total_q + start_q + rows, mask=rows < len_q, other=float("inf"))
    delta = tl.load(DELTA + head * total_q + start_q + rows, mask=rows < len_q, other=0.0)
    k_base = K + start_k * kv_stride + kv_head * HEAD_DIM
    v_base = V + start_k * kv_stride + kv_head * HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full_hi, hi = _key_range(start_m, len_k, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kv_stride, rows, 0, full_hi, len_k, offs_d,
                            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL, UPCAST, PRECISION)
    dq = _attn_bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, kv_stride, rows, full_hi, hi, len_k, offs_d,
                            qk_scale, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL, UPCAST, PRECISION)
    _store_tile(DQ + q_base, q_off, dq * sm_scale, rows, len_q, offs_d, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------------------------------------------
# Configs, filtered per GPU. Each candidate names the archs (compute capability major * 10 + minor, the report's
# sm_XX) and the largest head dim it is offered at; `gmaivl-rt kernels report` compiles it for exactly those archs at
# that head dim and finds it spill-free, within shared memory and on tensor cores there (tests/kernels/test_kernel_report.py).
# The first of each list is the default (interpreter, report variants) and is offered everywhere. q and the fp32
# accumulator live in registers: at head dim 128 a 128-row q block needs 8 warps, and the 128x128 forward tile fits
# only sm_90's register file and 227 KB of shared memory (on sm_80 it spills).
# ----------------------------------------------------------------------------------------------------------------
class AttentionConfig(NamedTuple):
    block_m: int                        # query rows per tile
    block_n: int                        # key rows per tile
    num_warps: int
    num_stages: int
    archs: tuple[int, ...] = (80, 90)   # the report archs this config is offered to (see `tuned_arch`)
    max_head_dim: int = MAX_HEAD_DIM    # offered at head dims up to this one

    def __str__(self):  # e.g. "128x128 w8 s2 sm_90": test ids, the GPU check's rows
        where = "" if self.archs == (80, 90) else " " + ",".join(f"sm_{a}" for a in self.archs)
        head_dims = "" if self.max_head_dim == MAX_HEAD_DIM else f" hd<={self.max_head_dim}"
        return f"{self.block_m}x{self.block_n} w{self.num_warps} s{self.num_stages}{where}{head_dims}"


ALL_ARCHS_AND_HEAD_DIMS = (AttentionConfig._field_defaults["archs"], AttentionConfig._field_defaults["max_head_dim"])
C = AttentionConfig
FWD_CONFIGS = [C(128, 32, 8, 3), C(128, 32, 8, 2), C(64, 64, 4, 3), C(64, 64, 4, 2), C(64, 32, 4, 4),
               # FA2's / the tutorial's 128x64 tile on 4 warps: spills at head dim 128 (BLOCK_D 128) on both archs
               C(128, 64, 4, 3, max_head_dim=64),
               # FA3-sized 128x128 on 8 warps: 254 registers and 160 KB on sm_90; spills on sm_80
               C(128, 128, 8, 2, archs=(90,))]
BWD_DKDV_CONFIGS = [C(32, 64, 8, 3), C(16, 64, 8, 3), C(32, 64, 8, 2), C(64, 64, 8, 2),
                    C(16, 128, 8, 2, archs=(90,))]  # 128-key blocks: 255 registers on sm_80 (at the limit)
BWD_DQ_CONFIGS = [C(128, 32, 8, 3), C(128, 32, 8, 2), C(64, 64, 8, 3), C(64, 64, 4, 2), C(64, 32, 4, 3),
                  C(128, 64, 8, 2, archs=(90,))]  # spills on sm_80
del C
DELTA_BLOCK_M = 64


def tuned_arch(capability: tuple[int, int]) -> int:
    """The report arch whose configs a GPU of compute capability (major, minor) is offered: 90 for Hopper (9.x:
    wgmma, 227 KB of shared memory per block), 80 (the Ampere-checked tiles, the smaller footprint) for any other."""
    major, _minor = capability
    return 90 if major == 9 else 80


def offered_configs(configs: list, capability: tuple[int, int], head_dim: int) -> list:
    """The configs of `configs` (a *_CONFIGS list) a GPU of compute capability (major, minor) autotunes over at
    `head_dim`: those naming its `tuned_arch` and taking that head dim."""
    arch = tuned_arch(capability)
    return [c for c in configs if arch in c.archs and head_dim <= c.max_head_dim]


def _triton_configs(configs):
    return [triton.Config({"BLOCK_M": c.block_m, "BLOCK_N": c.block_n}, num_warps=c.num_warps,
                          num_stages=c.num_stages) for c in configs]


_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "PRECISION"]
_LAST_TUNER: dict = {}  # kernel -> the autotuner its last CUDA launch used (`best_config`)


@functools.lru_cache(maxsize=None)
def _autotuner(kernel, configs: tuple):
    """One autotuner per (kernel, offered config set): a GPU tunes only over what its arch and head dim are offered."""
    return triton.autotune(_triton_configs(configs), key=_TUNE_KEY)(kernel)


def best_config(kernel):
    """The autotuner's winning triton.Config for `kernel` at its last tuned CUDA launch (None before one)."""
    tuner = _LAST_TUNER.get(kernel)
    return getattr(tuner, "best_config", None)


def _launch(kernel, configs, grid_of, device_tensor, *args, **constexprs):
    """On CUDA, autotune over the configs offered to the device's arch and head dim; otherwise (interpreter) launch
    the fixed default config. A config forced on CUDA (`forced_config`) must be one offered there."""
    if device_tensor.is_cuda:
        capability = torch.cuda.get_device_capability(device_tensor.device)
        offered = offered_configs(configs, capability, constexprs["HEAD_DIM"])
        if not config_forced(configs):
            tuner = _LAST_TUNER[kernel] = _autotuner(kernel, tuple(offered))
            tuner[lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)
            return
        if pick_config(configs) not in offered:
            raise ValueError(f"attention: config {pick_config(configs)} is not offered to sm_{tuned_arch(capability)} "
                             f"at head dim {constexprs['HEAD_DIM']} (see offered_configs)")
    config = pick_config(configs)
    kernel[grid_of(config.block_m, config.block_n)](*args, **constexprs, BLOCK_M=config.block_m,
                                                    BLOCK_N=config.block_n, num_warps=config.num_warps,
                                                    num_stages=config.num_stages)


# CUDA's grid limits: axis 0 up to 2**31 - 1 programs, axes 1 and 2 up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def _grid(*sizes):
    """A launch grid, checked against CUDA's limits (a launch past them fails with an opaque driver error)."""
    for axis, (size, limit) in enumerate(zip(sizes, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"attention: {size} programs on grid axis {axis} exceed CUDA's limit of {limit}")
    return tuple(sizes)


def _kernel_flags(q):
    head_dim = q.shape[-1]
    if unsupported_head_dim(head_dim):
        raise ValueError(f"attention: {unsupported_head_dim(head_dim)}")
    return dict(
        HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        # The interpreter cannot do arithmetic on bf16 (stored as raw uint16): upcast there, tl.dot on bf16 on GPU.
        UPCAST=interpreting() and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )


def _contiguous_aligned(t):
    """Contiguous and 16-byte aligned, as the kernels' vectorisation hints assume (a view may start anywhere)."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


class _FlashAttention(torch.autograd.Function):
    """Packed q (Tq, Hq, D), k/v (Tk, Hkv, D) with per-sequence bounds cu_q / cu_k (int32, n + 1)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, covers_all):
        """covers_all: cu_q[-1] == Tq and cu_k[-1] == Tk (the padded layout). Otherwise rows past the last
        sequence are written by no program, so outputs and gradients start zeroed (the reference gives 0 there)."""
        q, k, v = (_contiguous_aligned(t) for t in (q, k, v))
        total_q, num_heads, _ = q.shape
        group = num_heads // k.shape[1]
        n_seqs = cu_q.numel() - 1
        out = torch.empty_like(q) if covers_all else torch.zeros_like(q)
        lse = torch.empty((num_heads, total_q), device=q.device, dtype=torch.float32)
        flags = _kernel_flags(q)
        _launch(_attn_fwd_kernel, FWD_CONFIGS,
                lambda bm, bn: _grid(n_seqs * num_heads, triton.cdiv(max_q, bm)), q,
                q, k, v, out, lse, cu_q, cu_k, scale * _LOG2E, num_heads, group, total_q, CAUSAL=causal, **flags)
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, causal, scale, covers_all)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, causal, scale, covers_all = ctx.args
        grad_out = _contiguous_aligned(grad_out)
        total_q, num_heads, _ = q.shape
        num_kv_heads = k.shape[1]
        group = num_heads // num_kv_heads
        n_seqs = cu_q.numel() - 1
        flags = _kernel_flags(q)
        delta = torch.empty_like(lse)
        _attn_bwd_delta_kernel[(triton.cdiv(total_q, DELTA_BLOCK_M), num_heads)](
            out, grad_out, delta, total_q, num_heads, HEAD_DIM=flags["HEAD_DIM"], BLOCK_D=flags["BLOCK_D"],
            BLOCK_M=DELTA_BLOCK_M)
        new_grad = torch.Tensor.new_empty if covers_all else torch.Tensor.new_zeros
        dq = new_grad(q, q.shape)
        # one dk/dv slot per q head (see _attn_bwd_dkdv_kernel); a GQA group's slots are summed below
        dk_heads, dv_heads = (new_grad(t, (t.shape[0], num_heads, t.shape[2])) for t in (k, v))
        common = (cu_q, cu_k, scale * _LOG2E, scale, num_heads, group, total_q)
        _launch(_attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS,
                lambda bm, bn: _grid(n_seqs * num_heads, triton.cdiv(max_k, bn)), q,
                q, k, v, grad_out, dk_heads, dv_heads, lse, delta, *common, CAUSAL=causal, **flags)
        dk, dv = (t if group == 1 else t.view(t.shape[0], num_kv_heads, group, t.shape[2]).sum(2)
                  for t in (dk_heads, dv_heads))
        _launch(_attn_bwd_dq_kernel, BWD_DQ_CONFIGS,
                lambda bm, bn: _grid(n_seqs * num_heads, triton.cdiv(max_q, bm)), q,
                q, k, v, grad_out, dq, lse, delta, *common, CAUSAL=causal, **flags)
        return dq, dk, dv, None, None, None, None, None, None, None


def _attention_triton(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen):
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype}); the kernel multiplies "
                         "them together, cast them to one dtype first")
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    if cu_seqlens is None:  # padded: the same kernels with uniform sequence bounds
        batch, len_q, num_heads, head_dim = q.shape
        len_k = k.shape[1]
        if q.numel() == 0:
            return torch.empty_like(q)
        cu_q = torch.arange(0, (batch + 1) * len_q, len_q, dtype=torch.int32, device=q.device)
        cu_k = cu_q if len_k == len_q else torch.arange(0, (batch + 1) * len_k, len_k, dtype=torch.int32,
                                                       device=q.device)
        out = _FlashAttention.apply(q.reshape(batch * len_q, num_heads, head_dim),
                                    k.reshape(batch * len_k, *k.shape[2:]),
                                    v.reshape(batch * len_k, *v.shape[2:]), cu_q, cu_k, len_q, len_k, causal, scale,
                                    True)
        return out.view(q.shape)
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"attention: packed q has {q.shape[0]} tokens but k has {k.shape[0]}; with cu_seqlens "
                         "both index the same sequences")
    cu = cu_seqlens.to(q.device)
    if max_seqlen is None:  # this syncs with the device anyway, so also check the bounds the kernels will trust
        lengths = cu[1:] - cu[:-1]
        if cu.numel() < 1 or int(cu[0]) != 0 or bool((lengths < 0).any()) or int(cu[-1]) > q.shape[0]:
            raise ValueError(f"attention: cu_seqlens must start at 0, not decrease and end at most at the "
                             f"{q.shape[0]} tokens of q; got {cu_seqlens.tolist()}")
        max_seqlen = int(lengths.max()) if lengths.numel() else 0
    if q.numel() == 0 or max_seqlen == 0:
        return torch.zeros_like(q)
    return _FlashAttention.apply(q, k, v, cu, cu, max_seqlen, max_seqlen, causal, scale, False)


# ----------------------------------------------------------------------------------------------------------------
# GPU readiness report
# ----------------------------------------------------------------------------------------------------------------
REPORT_SHAPE = dict(batch=1, seqlen=4096, q_heads=32, kv_heads=8, head_dim=128, causal=True)
# (head dim, dtype, causal) the report also compiles each kernel's default config for: CLIP-L's 64, head dim 80,
# InternLM2's 128; fp16 and bf16; the LM's causal and the vision tower's bidirectional attention.
REPORT_VARIANTS = [(hd, dt, causal) for hd in (64, 80, 128) for dt in ("bf16", "fp16") for causal in (True, False)]


def _rooflines():
    b, s, hq, hkv, d = (REPORT_SHAPE[k] for k in ("batch", "seqlen", "q_heads", "kv_heads", "head_dim"))
    name = f"B={b} S={s} Hq={hq} Hkv={hkv} D={d} causal bf16"
    matmul = 2.0 * b * hq * s * s * d * 0.5  # one (S x S x D) product per head, half of it under the causal mask
    q_bytes, kv_bytes, row_bytes = 2.0 * b * s * hq * d, 2.0 * b * s * hkv * d, 4.0 * b * s * hq
    return {
        "fwd": Roofline(f"{name} fwd", 2 * matmul, 2 * q_bytes + 2 * kv_bytes + row_bytes),  # QK^T, PV
        "delta": Roofline(f"{name} bwd delta", 2.0 * b * s * hq * d, 2 * q_bytes + row_bytes),
        # recompute QK^T, dV, dP, dK; reads q, dO, lse, delta, k, v; writes dk, dv per q head (hq > hkv: the GQA
        # group's slots, summed afterwards by torch)
        "dkdv": Roofline(f"{name} bwd dk/dv", 4 * matmul,
                         2 * q_bytes + 2 * row_bytes + 2 * kv_bytes + 2 * (q_bytes if hq > hkv else kv_bytes)),
        # recompute QK^T, dP, dQ; reads q, dO, lse, delta, k, v; writes dq
        "dq": Roofline(f"{name} bwd dq", 3 * matmul, 3 * q_bytes + 2 * row_bytes + 2 * kv_bytes),
    }


def launch_attrs(fn, signature: dict, int_values: dict) -> dict:
    """Triton's launch-time specialisation as ASTSource `attrs` (KernelSpec.extra["attrs"]): every pointer is 16-byte
    aligned (the launchers guarantee it for the tensors they pass) and so is each integer argument whose value at the
    report shape is a multiple of 16."""
    names = [name for name, ty in signature.items()
             if ty.startswith("*") or (ty == "i32" and int_values.get(name, 1) % 16 == 0)]
    return {(fn.arg_names.index(name),): (("tt.divisibility", 16),) for name in names}


def report_specs(dtype: str = "bf16") -> list[KernelSpec]:
    """Every (kernel, config) the attention op can launch, for the named shape, with `dtype` pointers."""
    ptr, f32, i32 = f"*{dtype}", "*fp32", "*i32"
    d = REPORT_SHAPE["head_dim"]
    base = dict(HEAD_DIM=d, BLOCK_D=triton.next_power_of_2(d), CAUSAL=REPORT_SHAPE["causal"], UPCAST=False,
                PRECISION="ieee" if dtype == "fp32" else "tf32")
    scalars = {"qk_scale": "fp32", "NUM_HEADS": "i32", "GROUP": "i32", "total_q": "i32"}
    bwd_scalars = {"qk_scale": "fp32", "sm_scale": "fp32", "NUM_HEADS": "i32", "GROUP": "i32", "total_q": "i32"}
    roof = _rooflines()
    kernels = [
        ("attention_fwd", _attn_fwd_kernel, FWD_CONFIGS, roof["fwd"],
         {"Q": ptr, "K": ptr, "V": ptr, "Out": ptr, "LSE": f32, "CU_Q": i32, "CU_K": i32, **scalars}),
        ("attention_bwd_dkdv", _attn_bwd_dkdv_kernel, BWD_DKDV_CONFIGS, roof["dkdv"],
         {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "DK": ptr, "DV": ptr, "LSE": f32, "DELTA": f32, "CU_Q": i32,
          "CU_K": i32, **bwd_scalars}),
        ("attention_bwd_dq", _attn_bwd_dq_kernel, BWD_DQ_CONFIGS, roof["dq"],
         {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "DQ": ptr, "LSE": f32, "DELTA": f32, "CU_Q": i32, "CU_K": i32,
          **bwd_scalars}),
    ]
    int_values = {"NUM_HEADS": REPORT_SHAPE["q_heads"], "GROUP": REPORT_SHAPE["q_heads"] // REPORT_SHAPE["kv_heads"],
                  "total_q": REPORT_SHAPE["batch"] * REPORT_SHAPE["seqlen"]}
    specs = []
    for name, fn, configs, roofline, signature in kernels:
        constexpr_names = ("HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N", "CAUSAL", "UPCAST", "PRECISION")
        attrs = launch_attrs(fn, signature, int_values)
        for i, c in enumerate(configs):
            # on exactly the archs it is offered to, at the largest head dim it is offered at
            head_dim = min(d, c.max_head_dim)
            specs.append(KernelSpec(
                kernel=name, fn=fn, signature={**signature, **dict.fromkeys(constexpr_names, "constexpr")},
                constexprs={**base, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
                            "BLOCK_M": c.block_m, "BLOCK_N": c.block_n},
                num_warps=c.num_warps, num_stages=c.num_stages, default=i == 0, uses_dot=True, roofline=roofline,
                archs=c.archs, extra={"attrs": attrs, "restricted": c[4:] != ALL_ARCHS_AND_HEAD_DIMS}))
        # the default config at every other supported head dim, dtype and mask the model runs (`make report`)
        for head_dim, variant_dtype, causal in REPORT_VARIANTS:
            if (head_dim, variant_dtype, causal) == (d, dtype, REPORT_SHAPE["causal"]):
                continue
            variant_signature = {k: (f"*{variant_dtype}" if v == ptr else v) for k, v in signature.items()}
            bm, bn, warps, stages = configs[0][:4]
            specs.append(KernelSpec(
                kernel=name if variant_dtype == dtype else f"{name}[{variant_dtype}]", fn=fn,
                signature={**variant_signature, **dict.fromkeys(constexpr_names, "constexpr")},
                constexprs={**base, "HEAD_DIM": head_dim, "BLOCK_D": triton.next_power_of_2(head_dim),
                            "CAUSAL": causal, "BLOCK_M": bm, "BLOCK_N": bn},
                num_warps=warps, num_stages=stages, default=False, uses_dot=True, roofline=None,
                extra={"attrs": attrs, "variant": True}))
    delta_signature = {"Out": ptr, "DO": ptr, "DELTA": f32, "total_q": "i32", "NUM_HEADS": "i32"}
    specs.append(KernelSpec(
        kernel="attention_bwd_delta", fn=_attn_bwd_delta_kernel,
        signature={**delta_signature, **dict.fromkeys(("HEAD_DIM", "BLOCK_D", "BLOCK_M"), "constexpr")},
        constexprs={"HEAD_DIM": d, "BLOCK_D": base["BLOCK_D"], "BLOCK_M": DELTA_BLOCK_M}, num_warps=4,
        default=True, uses_dot=False, roofline=roof["delta"],
        extra={"attrs": launch_attrs(_attn_bwd_delta_kernel, delta_signature, int_values)}))
    return specs

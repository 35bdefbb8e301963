"""Attention on a GPU: our Triton FlashAttention-2 kernels vs torch SDPA (and flash-attn when installed), in TFLOP/s,
forward and forward+backward, bf16: the LLM's causal grouped-query attention (InternLM2-7B: 32 q heads, 8 kv heads,
head dim 128) and the vision tower's bidirectional attention (CLIP ViT-L/14-336: 577 tokens, 16 heads, head dim 64).
Decode attention (one token over a KV cache) vs SDPA with a cache-length mask, in TFLOP/s and GB/s. Reported as
ratios in extra_info (no timing assertions). Skipped, with the reason, on machines without CUDA."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from gmaivl_rt.kernels.attention import attention, attention_reference

from gmaivl_rt.kernels.decode_attention import decode_attention, decode_attention_reference

from gmaivl_rt.kernels._dispatch import kernels

pytestmark = pytest.mark.gpu  # bench/conftest.py skips these, with the reason, where no CUDA device runs Triton

HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None

# (name, batch, seq, q_heads, kv_heads, head_dim, causal)
SHAPES = [("llm_causal_gqa", 1, 4096, 32, 8, 128, True), ("llm_causal_gqa_short", 4, 1024, 32, 8, 128, True),
          ("vision_bidirectional", 8, 577, 16, 16, 64, False)]
# (name, batch, cache_len, q_heads, kv_heads, head_dim)
DECODE_SHAPES = [("decode_b1_8k", 1, 8192, 32, 8, 128), ("decode_b8_4k", 8, 4096, 32, 8, 128)]


def _attention_flops(batch, seq, q_heads, head_dim, causal):
    """Forward FLOPs: the QK^T and PV products (2 * 2 * S * S * D per head), halved under the causal mask."""
    return 4.0 * batch * q_heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def _inputs(batch, seq, q_heads, kv_heads, head_dim, requires_grad):
    make = lambda heads: torch.randn(batch, seq, heads, head_dim, device="cuda", dtype=torch.bfloat16,  # noqa: E731
                                     requires_grad=requires_grad)
    return make(q_heads), make(kv_heads), make(kv_heads)


def _competitors(causal):
    """name -> fn(q, k, v) on (B, S, H, D) tensors. SDPA picks its fastest backend (flash / cuDNN / efficient)."""
    fns = {"sdpa": lambda q, k, v: attention_reference(q, k, v, causal=causal)}
    if HAS_FLASH_ATTN:
        from flash_attn import flash_attn_func
        fns["flash_attn"] = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
    return fns


def _report(benchmark, cuda_ms, tflops, ours_fn, others, flops, bytes_moved=None):
    with kernels("triton"):
        ours_fn()  # autotune outside the timed region
        benchmark.pedantic(lambda: (ours_fn(), torch.cuda.synchronize()), rounds=20, warmup_rounds=3)
        ours_ms = cuda_ms(ours_fn)
    info = {"ours_ms": ours_ms, "ours_tflops": tflops(flops, ours_ms)}
    line = f"\n{benchmark.name}: ours {info['ours_tflops']:.1f} TFLOP/s"
    if bytes_moved is not None:
        info["ours_gbps"] = bytes_moved / (ours_ms * 1e-3) / 1e9
    for name, fn in others.items():
        ms = cuda_ms(fn)
        info[f"{name}_ms"], info[f"{name}_tflops"] = ms, tflops(flops, ms)
        info[f"ratio_vs_{name}"] = ms / ours_ms  # > 1: ours is faster
        line += f", {name} {info[f'{name}_tflops']:.1f} TFLOP/s ({ms / ours_ms:.2f}x)"
    benchmark.extra_info.update(info)
    print(line)


@pytest.mark.parametrize("name,batch,seq,q_heads,kv_heads,head_dim,causal", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_forward(benchmark, cuda_ms, tflops, name, batch, seq, q_heads, kv_heads, head_dim, causal):
    q, k, v = _inputs(batch, seq, q_heads, kv_heads, head_dim, requires_grad=False)
    others = {n: (lambda f=f: f(q, k, v)) for n, f in _competitors(causal).items()}
    _report(benchmark, cuda_ms, tflops, lambda: attention(q, k, v, causal=causal), others,
            _attention_flops(batch, seq, q_heads, head_dim, causal))


@pytest.mark.parametrize("name,batch,seq,q_heads,kv_heads,head_dim,causal", SHAPES, ids=[s[0] for s in SHAPES])
def test_attention_forward_backward(benchmark, cuda_ms, tflops, name, batch, seq, q_heads, kv_heads, head_dim,
                                    causal):
    q, k, v = _inputs(batch, seq, q_heads, kv_heads, head_dim, requires_grad=True)
    grad_out = torch.randn_like(q)

    def step(fn):
        def run():
            fn(q, k, v).backward(grad_out)
            q.grad = k.grad = v.grad = None
        return run

    others = {n: step(f) for n, f in _competitors(causal).items()}
    # backward = 2.5x forward (recompute QK^T, then dV, dP, dS->dQ, dK: 5 products vs 2), as the FA2 paper counts
    _report(benchmark, cuda_ms, tflops, step(lambda q, k, v: attention(q, k, v, causal=causal)), others,
            3.5 * _attention_flops(batch, seq, q_heads, head_dim, causal))


def test_attention_packed_varlen_forward_backward(benchmark, cuda_ms, tflops):
    """Soft-packed training batch: 8 sequences of unequal length in one buffer vs SDPA sequence by sequence."""
    lengths = [512, 1536, 300, 1748, 1024, 900, 100, 2072]
    cu_seqlens = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    total, q_heads, kv_heads, head_dim = sum(lengths), 32, 8, 128
    q = torch.randn(total, q_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(total, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    grad_out = torch.randn_like(q)

    def step(fn):
        def run():
            fn().backward(grad_out)
            q.grad = k.grad = v.grad = None
        return run

    ours = step(lambda: attention(q, k, v, causal=True, cu_seqlens=cu_seqlens, max_seqlen=max(lengths)))
    others = {"sdpa_per_sequence": step(lambda: attention_reference(q, k, v, causal=True, cu_seqlens=cu_seqlens))}
    if HAS_FLASH_ATTN:
        from flash_attn import flash_attn_varlen_func
        others["flash_attn_varlen"] = step(lambda: flash_attn_varlen_func(
            q, k, v, cu_seqlens, cu_seqlens, max(lengths), max(lengths), causal=True))
    flops = 3.5 * sum(_attention_flops(1, n, q_heads, head_dim, True) for n in lengths)
    _report(benchmark, cuda_ms, tflops, ours, others, flops)


@pytest.mark.parametrize("name,batch,cache_len,q_heads,kv_heads,head_dim", DECODE_SHAPES,
                         ids=[s[0] for s in DECODE_SHAPES])
def test_decode_attention(benchmark, cuda_ms, tflops, name, batch, cache_len, q_heads, kv_heads, head_dim):
    q = torch.randn(batch, q_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    k_cache, v_cache = (torch.randn(batch, cache_len, kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
    cache_seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    cache_seqlens[0] = cache_len * 3 // 4  # one sequence shorter than the cache
    others = {"sdpa_masked": lambda: decode_attention_reference(q, k_cache, v_cache, cache_seqlens)}
    if HAS_FLASH_ATTN:
        from flash_attn import flash_attn_with_kvcache
        others["flash_attn_kvcache"] = lambda: flash_attn_with_kvcache(q[:, None], k_cache, v_cache,
                                                                        cache_seqlens=cache_seqlens)
    valid = cache_seqlens.sum().item()
    flops = 4.0 * q_heads * valid * head_dim
    bytes_moved = 2.0 * 2 * valid * kv_heads * head_dim  # k and v entries read once, bf16; decode is memory-bound
    _report(benchmark, cuda_ms, tflops, lambda: decode_attention(q, k_cache, v_cache, cache_seqlens), others, flops,
            bytes_moved)

"""The attention kernel's Triton path against the fp32 reference and autograd on the same inputs: output and the
three input gradients. Shared by tests/kernels/test_attention.py and test_attention_blocks.py.

Tolerances per input dtype, (forward, gradients), max abs error vs an fp32 reference on the same, upcast, inputs
(values and gradients are O(1)): fp32 1e-4 both; fp16 2e-3 / 1e-2 (fp16 operands of the tensor-core products, fp32
accumulation); bf16 2e-2 / 5e-2 (8-bit mantissa; the interpreter upcasts bf16, see the kernel's UPCAST)."""
from __future__ import annotations

import torch

from gmaivl_rt.kernels.attention import _attention_triton, attention_reference

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 1e-2), torch.bfloat16: (2e-2, 5e-2)}  # (fwd, grads)


def check_against_fp32(q, k, v, causal, cu_seqlens=None, max_seqlen=None, softmax_scale=None) -> None:
    """Run the Triton path and the fp32 reference on the same inputs; compare output and all three gradients.
    q (B, S, Hq, D) or packed (T, Hq, D), k/v likewise with Hkv heads, all one float dtype and requiring grad."""
    fwd_tol, grad_tol = TOL[q.dtype]
    out = _attention_triton(q, k, v, causal, softmax_scale, cu_seqlens, max_seqlen)
    assert out.shape == q.shape and out.dtype == q.dtype
    ref_inputs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref = attention_reference(*ref_inputs, causal=causal, softmax_scale=softmax_scale, cu_seqlens=cu_seqlens)
    torch.testing.assert_close(out.float(), ref, atol=fwd_tol, rtol=0)

    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(q.dtype))
    ref_grads = torch.autograd.grad(ref, ref_inputs, grad_out)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == q.dtype
        torch.testing.assert_close(got.float(), want, atol=grad_tol, rtol=grad_tol, msg=lambda m: f"d{name}: {m}")

"""Shared checks of the row-wise kernel tests (RMSNorm, LayerNorm, RoPE, SwiGLU): run an op forward and backward
with a fixed upstream gradient and compare outputs and input gradients with per-dtype tolerances."""
from __future__ import annotations

import torch

# (atol, rtol) per dtype. The kernels compute in fp32 and round once on store, while the references round after
# each torch op in the low-precision dtype, so the gap is a few units in the last place of that dtype. atol is
# scaled by the largest magnitude in the expected tensor (at least 1): a weight gradient sums many rounded terms,
# so its error follows the size of the sum's terms, not of each (possibly cancelled) result.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (3e-2, 2e-2),
}

DTYPES = list(TOLERANCES)


def forward_backward(fn, inputs, *, seed=1):
    """Run fn(*inputs) with fresh leaf copies of the floating-point inputs, backpropagate a fixed random gradient
    through every output. Returns (outputs, gradients of the floating-point inputs)."""
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    outputs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=generator).to(o.dtype) for o in outputs]
    torch.autograd.backward(outputs, grads_out)
    return outputs, [leaf.grad for leaf in leaves if leaf.is_floating_point()]


def assert_close_for_dtype(actual, expected, dtype, what):
    atol, rtol = TOLERANCES[dtype]
    atol *= max(1.0, expected.detach().abs().max().item()) if expected.numel() else 1.0
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol, msg=lambda m: f"{what} ({dtype}): {m}")


def check_matches_reference(op, reference, inputs, dtype, grad_of=None):
    """Outputs and gradients of `op` (Triton path) match `reference` + autograd. `grad_of` lists the positions of
    the inputs whose gradients are compared (default: every floating-point input)."""
    outputs, grads = forward_backward(op, inputs)
    ref_outputs, ref_grads = forward_backward(reference, inputs)
    assert len(outputs) == len(ref_outputs)
    for i, (out, ref) in enumerate(zip(outputs, ref_outputs)):
        assert out.shape == ref.shape, f"output {i}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
        assert_close_for_dtype(out, ref, dtype, f"output {i}")
    for i in grad_of if grad_of is not None else range(len(ref_grads)):
        assert grads[i] is not None, f"input {i}: no gradient"
        assert_close_for_dtype(grads[i], ref_grads[i], dtype, f"gradient of input {i}")

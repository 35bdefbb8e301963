"""Shared checks of the row-wise kernel tests (RMSNorm, LayerNorm, RoPE, SwiGLU): run an op forward and backward
with a fixed upstream gradient and compare outputs and input gradients against an fp32 ground truth.

fp16/bf16: the ground truth is the PyTorch reference run in fp32 on the upcast half-precision inputs (and the same,
upcast, upstream gradient); the same reference run in the half dtype is the yardstick. A kernel computes in fp32
and rounds once on store, so its error against the truth must stay within a small factor of the half-precision
reference's own error, measured on each tensor's own scale:
  - relative error norm ||ours - truth|| / ||truth|| <= ratio x the yardstick's (or floor x eps where the
    yardstick is exact),
  - every element: |ours - truth| <= k x eps x (|truth| + mean|truth|), eps the dtype's machine epsilon:
    a few units in the last place of the element, or of the tensor's typical element where the element is a
    cancelled sum near 0.
fp32: the same, with the reference run in fp64 as the truth and fp32's eps.
The former check (a half-precision reference, atol scaled by max|expected| applied to every element) allowed
1.12 on bf16 RMSNorm weight gradients of at most 37: a weight gradient summed in bf16 passed it.
"""
from __future__ import annotations

import torch

# Per dtype: (RATIO, FLOOR_ULPS, ELEMENT_ULPS), each about 1.5-2x the worst measured on the tests' inputs.
#   RATIO: ||ours - truth|| may be at most RATIO x ||reference in the same dtype - truth||. The references round
#     after every torch op, the kernels once: fp16 measured <= 1.0x, fp32 <= 1.5x. bf16 measured <= 2.8x: the Triton
#     interpreter converts fp32 to bf16 by truncation (toward zero), not round-to-nearest as torch and GPUs do, so
#     each bf16 store is off by up to 1 ulp instead of 1/2 (fp16 stores do round to nearest).
#   FLOOR_ULPS: where the yardstick happens to be (near) exact, a relative error norm of FLOOR_ULPS x eps passes
#     (one rounding per element gives at most eps / 2, bf16 truncation eps); measured <= 1.56 eps in fp32.
#   ELEMENT_ULPS: |ours - truth| <= ELEMENT_ULPS x eps x (|truth| + mean|truth|) per element; measured worst: fp32
#     4.9 (LayerNorm rows with a large mean), fp16 1.0, bf16 1.35.
LIMITS = {
    torch.float32: (2.0, 2.5, 8.0),
    torch.float16: (1.5, 1.0, 2.0),
    torch.bfloat16: (3.5, 1.0, 2.5),
}
EPS = {dtype: torch.finfo(dtype).eps for dtype in LIMITS}
TRUTH_DTYPE = {torch.float32: torch.float64, torch.float16: torch.float32, torch.bfloat16: torch.float32}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def forward_backward(fn, inputs, *, round_to=None, seed=1):
    """Run fn(*inputs) with fresh leaf copies of the floating-point inputs, backpropagate a fixed random gradient
    (rounded to `round_to`, default each output's dtype, then cast to the output's dtype) through every output.
    Returns (outputs, gradients of the floating-point inputs)."""
    leaves = [t.detach().clone().requires_grad_(True) if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    outputs = out if isinstance(out, tuple) else (out,)
    generator = torch.Generator().manual_seed(seed)
    grads_out = [torch.randn(o.shape, generator=generator).to(round_to or o.dtype).to(o.dtype) for o in outputs]
    torch.autograd.backward(outputs, grads_out)
    return outputs, [leaf.grad for leaf in leaves if leaf.is_floating_point()]


def upcast(inputs, dtype=torch.float32):
    """The floating-point inputs in `dtype` (exact for values of a narrower float dtype); others unchanged."""
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def relative_error(actual, truth) -> float:
    """||actual - truth|| / ||truth|| in fp64 (0 for an all-zero truth matched exactly)."""
    diff = (actual.double() - truth.double()).norm().item()
    scale = truth.double().norm().item()
    return diff / scale if scale else diff


def assert_close_to_truth(actual, truth, yardstick, dtype, what):
    """`actual` (computed in `dtype`) against the wider-precision `truth`, on the scale of the tensor itself;
    `yardstick` is the same quantity from the reference run in `dtype` (None: no yardstick, the floor alone)."""
    expected_dtype = yardstick.dtype if yardstick is not None else truth.dtype
    assert actual.dtype == expected_dtype, f"{what}: dtype {actual.dtype} != {expected_dtype}"
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    eps = EPS[dtype]
    ratio, floor_ulps, element_ulps = LIMITS[dtype]
    ours = relative_error(actual, truth)
    reference = relative_error(yardstick, truth) if yardstick is not None else 0.0
    allowed = max(ratio * reference, floor_ulps * eps)
    assert ours <= allowed, (f"{what} ({dtype}): relative error norm {ours:.3g} vs the truth; the {dtype} "
                             f"reference's is {reference:.3g} (allowed {allowed:.3g})")
    truth64 = truth.detach().double()
    bound = element_ulps * eps * (truth64.abs() + truth64.abs().mean())
    excess = ((actual.detach().double() - truth64).abs() - bound).flatten()
    if excess.numel() and excess.max() > 0:
        i = int(excess.argmax())
        raise AssertionError(f"{what} ({dtype}): element {i} is {actual.flatten()[i].item():.6g}, truth "
                             f"{truth.flatten()[i].item():.6g}: off by more than {element_ulps} x eps x "
                             f"(|truth| + mean|truth|) = {bound.flatten()[i].item():.3g}")


def check_matches_reference(op, reference, inputs, dtype, grad_of=None):
    """Outputs and gradients of `op` (Triton path) on `inputs` (in `dtype`) against `reference` + autograd run in
    fp32 on the upcast inputs, with the reference run in `dtype` as the yardstick. `grad_of` lists the positions
    of the inputs whose gradients are compared (default: every floating-point input). fp32 runs take an fp64
    truth."""
    outputs, grads = forward_backward(op, inputs, round_to=dtype)
    truth_outputs, truth_grads = forward_backward(reference, upcast(inputs, TRUTH_DTYPE[dtype]), round_to=dtype)
    yard_outputs, yard_grads = forward_backward(reference, inputs, round_to=dtype)
    assert len(outputs) == len(truth_outputs)
    for i, (out, truth, yard) in enumerate(zip(outputs, truth_outputs, yard_outputs)):
        assert_close_to_truth(out, truth, yard, dtype, f"output {i}")
    for i in grad_of if grad_of is not None else range(len(truth_grads)):
        assert grads[i] is not None, f"input {i}: no gradient"
        assert_close_to_truth(grads[i], truth_grads[i], yard_grads[i], dtype, f"gradient of input {i}")

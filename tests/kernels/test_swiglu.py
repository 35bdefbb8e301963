"""SwiGLU Triton kernels (interpreted) against the PyTorch reference (F.silu(gate) * up) + autograd run in a wider
precision on the upcast inputs (the ground truth), the same in the test dtype as the yardstick
(tests/support/rowwise_checks.py). Mutant, applied by hand to kernels/swiglu.py: the sigmoid in silu's derivative rounded
to the half dtype (`(1.0 - sig.to(GATE.dtype.element_ty).to(tl.float32))`): fails here in bf16; the former check
(atol x max|expected| on every element) passed it."""
import pytest
import torch
from rowwise_checks import DTYPES, check_matches_reference

from gmaivl_rt.kernels.swiglu import swiglu, swiglu_reference


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 80), (17, 96), (127, 64), (2, 3, 1000)])
def test_swiglu_matches_reference(triton_path, shape, dtype):
    # Gates over [-8, 8]: both the saturated tails of silu and its curved middle.
    gate = (4.0 * torch.randn(shape)).clamp(-8, 8).to(dtype)
    up = torch.randn(shape).to(dtype)
    check_matches_reference(swiglu, swiglu_reference, (gate, up), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_non_contiguous_inputs(triton_path, dtype):
    # gate and up as the two halves of one fused gate_up projection: strided views.
    gate_up = torch.randn(17, 2 * 96).to(dtype)
    gate, up = gate_up[:, :96], gate_up[:, 96:]
    assert not gate.is_contiguous()
    check_matches_reference(swiglu, swiglu_reference, (gate, up), dtype)


def test_swiglu_rejects_mismatched_inputs(triton_path):
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(torch.randn(4, 96), torch.randn(4, 95))
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(torch.randn(4, 96), torch.randn(4, 96).half())

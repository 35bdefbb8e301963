"""LayerNorm Triton kernels (interpreted) against torch's F.layer_norm + autograd run in a wider precision on the
upcast inputs (the ground truth), the same in the test dtype as the yardstick (tests/support/rowwise_checks.py).
Mutants, applied by hand to kernels/layer_norm.py:
  - the weight gradient accumulated in the half dtype (`dw_acc = (dw_acc + dy * x_hat).to(X.dtype.element_ty)
    .to(tl.float32)`): fails here in bf16; the former check (atol x max|expected| on every element) passed it;
  - a one-pass variance (`tl.sum(x * x) / n - mean * mean`, cancelling on rows with a large mean): fails here in
    fp32 (4 tests; fp64 truth); the former check passed it.
"""
import pytest
import torch
from rowwise_checks import DTYPES, check_matches_reference

from gmaivl_rt.kernels.layer_norm import layer_norm, layer_norm_reference

EPS = 1e-5


def _inputs(shape, dtype):
    hidden = shape[-1]
    # A non-zero mean per row exercises the centring; weight and bias away from 1 and 0 exercise the affine part.
    x = (torch.randn(shape) + 3.0 * torch.randn(shape[:-1] + (1,))).to(dtype)
    return x, (1.0 + 0.1 * torch.randn(hidden)).to(dtype), (0.1 * torch.randn(hidden)).to(dtype)


def _op(x, weight, bias):
    return layer_norm(x, weight, bias, EPS)


def _reference(x, weight, bias):
    return layer_norm_reference(x, weight, bias, EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 80), (17, 96), (127, 64), (2, 3, 1000)])
def test_layer_norm_matches_reference(triton_path, shape, dtype):
    check_matches_reference(_op, _reference, _inputs(shape, dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_without_bias(triton_path, dtype):
    x, weight, _ = _inputs((17, 96), dtype)
    check_matches_reference(lambda a, w: _op(a, w, None), lambda a, w: _reference(a, w, None), (x, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_non_contiguous_input(triton_path, dtype):
    _, weight, bias = _inputs((17, 96), dtype)
    x = _inputs((96, 17), dtype)[0].t()  # (17, 96) with column-major strides
    assert not x.is_contiguous()
    check_matches_reference(_op, _reference, (x, weight, bias), dtype)


def test_layer_norm_rejects_mismatched_parameters(triton_path):
    x = torch.randn(4, 96)
    with pytest.raises(ValueError, match="weight has shape"):
        layer_norm(x, torch.ones(64), torch.zeros(96))
    with pytest.raises(ValueError, match="bias has shape"):
        layer_norm(x, torch.ones(96), torch.zeros(95))

"""RMSNorm Triton kernels (interpreted) against the PyTorch reference + autograd and transformers' LlamaRMSNorm,
each run in fp32 on the upcast inputs as the ground truth, the same run in fp16/bf16 as the yardstick
(tests/support/rowwise_checks.py). Mutants, applied by hand to kernels/rms_norm.py:
  - the weight gradient accumulated in the half dtype
    (`dw_acc = (dw_acc + dy * x_hat...).to(X.dtype.element_ty).to(tl.float32)`): fails here in bf16 (17 and 127
    rows); the former check (atol 3e-2 x max|expected| on every element, 1.12 on gradients <= 37) passed it;
  - the sum of squares in the half dtype (`tl.sum((x * x).to(X.dtype.element_ty), ...)`): fails here in bf16 (as
    it did before).
"""
import pytest
import torch
from rowwise_checks import DTYPES, assert_close_to_truth, check_matches_reference

from gmaivl_rt.kernels.rms_norm import rms_norm, rms_norm_reference

EPS = 1e-6


def _inputs(shape, dtype, weight_dtype=None):
    x = torch.randn(shape).to(dtype)
    weight = (1.0 + 0.1 * torch.randn(shape[-1])).to(weight_dtype or dtype)
    return x, weight


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 80), (17, 96), (127, 64), (2, 3, 1000)])
def test_rms_norm_matches_reference(triton_path, shape, dtype):
    x, weight = _inputs(shape, dtype)
    check_matches_reference(lambda a, w: rms_norm(a, w, EPS), lambda a, w: rms_norm_reference(a, w, EPS),
                            (x, weight), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_non_contiguous_input(triton_path, dtype):
    x = torch.randn(96, 17).to(dtype).t()  # (17, 96) with column-major strides
    assert not x.is_contiguous()
    weight = (1.0 + 0.1 * torch.randn(96)).to(dtype)
    check_matches_reference(lambda a, w: rms_norm(a, w, EPS), lambda a, w: rms_norm_reference(a, w, EPS),
                            (x, weight), dtype)


def test_rms_norm_fp32_weight_bf16_activations_promotes(triton_path):
    x, weight = _inputs((17, 96), torch.bfloat16, weight_dtype=torch.float32)
    y = rms_norm(x, weight, EPS)
    assert y.dtype == torch.float32
    # The normalised row is rounded to bf16 before the fp32 weight, as in the reference: bf16-level agreement.
    assert_close_to_truth(y, rms_norm_reference(x.float(), weight, EPS), rms_norm_reference(x, weight, EPS),
                          torch.bfloat16, "output")


def test_rms_norm_matches_transformers_llama(triton_path):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(96, eps=EPS).to(torch.bfloat16)
    with torch.no_grad():
        module.weight.copy_(1.0 + 0.1 * torch.randn(96))
    x = torch.randn(2, 17, 96).to(torch.bfloat16)
    with torch.no_grad():
        yardstick = module(x)
        truth = module.float()(x.float())
    assert_close_to_truth(rms_norm(x, module.weight.to(torch.bfloat16), EPS), truth, yardstick, torch.bfloat16,
                          "output")


def test_rms_norm_rejects_mismatched_weight(triton_path):
    with pytest.raises(ValueError, match="weight has shape"):
        rms_norm(torch.randn(4, 96), torch.ones(64))

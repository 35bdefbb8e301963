"""The auto mode's routing on CUDA (fp32 and unsupported head dims take the reference), decided by a pure function
so it is checked here without a GPU, and the forced triton mode's refusal of unsupported head dims."""
import pytest
import torch

from gmaivl_rt.kernels import _dispatch, attention, decode_attention, kernels


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_gemm_ops_take_triton_on_cuda(dtype):
    assert _dispatch.reference_reason("cuda", dtype, gemm=True) is None
    assert _dispatch.reference_reason("cuda", dtype, gemm=True, head_dim=128) is None
    assert _dispatch.reference_reason("cuda", dtype, gemm=True, head_dim=80) is None


def test_fp32_gemm_ops_take_the_reference_on_cuda_but_row_ops_do_not():
    assert "fp32" in _dispatch.reference_reason("cuda", torch.float32, gemm=True)
    assert _dispatch.reference_reason("cuda", torch.float32) is None  # rms_norm, rope, swiglu: no tiles to spill


@pytest.mark.parametrize("head_dim", [256, 160, 136])
def test_unsupported_head_dims_take_the_reference_on_cuda(head_dim):
    reason = _dispatch.reference_reason("cuda", torch.bfloat16, gemm=True, head_dim=head_dim)
    assert reason and f"head_dim {head_dim}" in reason and "128" in reason


def test_cpu_takes_the_reference():
    assert _dispatch.reference_reason("cpu", torch.bfloat16, gemm=True) == "not a CUDA tensor"


def test_autocast_dtype_decides_under_autocast():
    x = torch.randn(2, 2)
    assert _dispatch.compute_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _dispatch.compute_dtype(x) == torch.bfloat16


def test_auto_mode_routes_by_the_policy(monkeypatch):
    """use_triton in auto mode asks reference_reason with the op's compute dtype and head dim (CUDA faked: the
    tensors' is_cuda is all this machine lacks)."""
    seen = []
    monkeypatch.setattr(_dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(_dispatch, "reference_reason",
                        lambda device, dtype, **kw: seen.append((device, dtype, kw)) or "no")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    with kernels("auto"):
        assert not _dispatch.use_triton(torch.randn(2).half(), gemm=True, head_dim=64)
    assert seen == [("cuda", torch.float16, {"gemm": True, "head_dim": 64})]


@pytest.mark.parametrize("head_dim", [256, 136])
def test_forced_triton_refuses_unsupported_head_dims_clearly(head_dim):
    q = torch.randn(1, 3, 2, head_dim)
    with kernels("triton"), pytest.raises(ValueError, match=f"head_dim {head_dim} is not supported"):
        attention(q, q, q)
    with kernels("triton"), pytest.raises(ValueError, match=f"head_dim {head_dim} is not supported"):
        decode_attention(q[:, 0], q, q, torch.tensor([3], dtype=torch.int32))
    with kernels("auto"):  # on CPU: the reference, whatever the head dim
        torch.testing.assert_close(attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(
            *(q.transpose(1, 2),) * 3).transpose(1, 2))

"""Projector GEMMs (kernels/projector.py): the Triton path (interpreted on CPU) against torch's F.linear + F.gelu
and autograd, forward and gradients, at sizes that are not multiples of the 128x128x64 tile.

Tolerances (absolute, on values of order 1 - inputs are scaled so outputs stay O(1)):
  fp32: 1e-4 (fp32 accumulation in both; only summation order differs)
  fp16: outputs 4e-3, gradients 1e-2 (operands and the stored result round to fp16, ~1e-3 relative; the weight
        gradient sums over all M tokens before its fp16 rounding). The reference runs in fp32 on the same
        fp16-representable inputs.
bf16 is not tested here: the interpreter cannot run tl.dot on bf16 (see docs on Triton on CPU).
"""
import importlib

import pytest
import torch

from gmaivl_rt.kernels.projector import fused_linear, fused_linear_reference, mlp2x_gelu

projector = importlib.import_module("gmaivl_rt.kernels.projector")

TOL = {torch.float32: dict(out=1e-4, grad=1e-4), torch.float16: dict(out=4e-3, grad=1e-2)}


def _inputs(shape_x, n, dtype, bias):
    k = shape_x[-1]
    x = torch.randn(*shape_x).to(dtype).requires_grad_()
    w = (torch.randn(n, k) / k**0.5).to(dtype).requires_grad_()
    b = torch.randn(n).to(dtype).requires_grad_() if bias else None
    return x, w, b


def _grads(out, grad_out, tensors):
    out.backward(grad_out)
    grads = [None if t is None else t.grad.float() for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return grads


def _check_against_fp32_reference(x, w, b, activation, dtype, leading=None):
    y = fused_linear(x, w, b, activation)
    assert y.dtype == dtype and y.shape == (*x.shape[:-1], w.shape[0])
    grad_y = torch.randn(y.shape).to(dtype)
    got = _grads(y, grad_y, [x, w, b])
    # the reference sees the same (fp16-representable) values, upcast to fp32
    xr, wr = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    br = None if b is None else b.detach().float().requires_grad_()
    yr = fused_linear_reference(xr, wr, br, activation)
    want = _grads(yr, grad_y.float(), [xr, wr, br])
    tol = TOL[dtype]
    torch.testing.assert_close(y.float(), yr.detach(), atol=tol["out"], rtol=tol["out"])
    for name, g, r in zip(("x", "weight", "bias"), got, want):
        if r is not None:
            torch.testing.assert_close(g, r, atol=tol["grad"], rtol=tol["grad"], msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,k,n", [(1, 72, 100), (17, 100, 72), (127, 64, 130)])
@pytest.mark.parametrize("bias,activation", [(True, "gelu"), (False, None)])
def test_fused_linear_matches_torch(triton_path, m, k, n, dtype, bias, activation):
    x, w, b = _inputs((m, k), n, dtype, bias)
    _check_against_fp32_reference(x, w, b, activation, dtype)


@pytest.mark.parametrize("bias,activation", [(True, None), (False, "gelu")])
def test_fused_linear_bias_and_gelu_separately(triton_path, bias, activation):
    x, w, b = _inputs((33, 40), 24, torch.float32, bias)
    _check_against_fp32_reference(x, w, b, activation, torch.float32)


def test_fused_linear_several_tiles_and_leading_dims(triton_path):
    # 2*150 = 300 rows and 200 columns: a 3x2 grid of 128x128 tiles with ragged edges; K=72 is one full and one
    # partial K step.
    x, w, b = _inputs((2, 150, 72), 200, torch.float32, True)
    _check_against_fp32_reference(x, w, b, "gelu", torch.float32)


def test_mlp2x_gelu_matches_reference(triton_path):
    x = torch.randn(3, 5, 48, requires_grad=True)
    w1, b1 = (torch.randn(64, 48) / 7).requires_grad_(), torch.randn(64, requires_grad=True)
    w2, b2 = (torch.randn(40, 64) / 8).requires_grad_(), torch.randn(40, requires_grad=True)
    params = [x, w1, b1, w2, b2]
    y = mlp2x_gelu(*params)
    grad_y = torch.randn_like(y)
    got = _grads(y, grad_y, params)
    ref = torch.nn.functional.linear(torch.nn.functional.gelu(torch.nn.functional.linear(x, w1, b1)), w2, b2)
    want = _grads(ref, grad_y, params)
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)


def test_matmul_transposed_operands_and_accumulate(triton_path):
    # The backward GEMMs read operands through swapped strides; check that directly, and the += epilogue.
    a = torch.randn(50, 37)
    b = torch.randn(29, 50)
    out = torch.randn(37, 29)
    expected = out + a.t() @ b.t()
    projector.matmul(a.t(), b.t(), out, accumulate=True)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_fused_linear_no_grad_keeps_no_pre_activation(triton_path, monkeypatch):
    stored_pre = []
    matmul = projector.matmul

    def recording_matmul(*args, **kwargs):
        stored_pre.append(kwargs.get("pre") is not None)
        return matmul(*args, **kwargs)

    monkeypatch.setattr(projector, "matmul", recording_matmul)
    x, w, b = _inputs((9, 16), 8, torch.float32, True)
    with torch.no_grad():
        y = fused_linear(x, w, b, "gelu")
    assert y.grad_fn is None and stored_pre == [False]
    torch.testing.assert_close(y, fused_linear_reference(x, w, b, "gelu").detach(), atol=1e-5, rtol=1e-5)
    fused_linear(x, w, b, "gelu")
    assert stored_pre == [False, True]


def test_fused_linear_rejects_bad_input(triton_path):
    x, w, _ = _inputs((4, 8), 6, torch.float32, False)
    with pytest.raises(ValueError, match="activation"):
        fused_linear(x, w, None, "relu")
    with pytest.raises(ValueError, match="does not match weight"):
        fused_linear(torch.randn(4, 9), w)
    with pytest.raises(TypeError, match="float16"):
        fused_linear(x.half(), w)
    with pytest.raises(ValueError, match="bias"):
        fused_linear(x, w, torch.randn(5))


def test_report_specs_cover_every_config():
    specs = projector.report_specs()
    gemms = [s for s in specs if s.uses_dot]
    for name in ("projector_linear_gelu_fwd", "projector_linear_fwd", "projector_linear_bwd_dx",
                 "projector_linear_bwd_dw"):
        rows = [s for s in gemms if s.kernel == name]
        assert len(rows) == len(projector.GEMM_CONFIGS)
        assert sum(s.default for s in rows) == 1
        assert all(s.roofline is not None and s.roofline.flops > 0 for s in rows)


def test_fused_linear_follows_autocast(triton_path):
    # Under autocast F.linear runs in the autocast dtype; so does fused_linear, and grads reach the fp32 leaves.
    x, w, b = _inputs((5, 16), 8, torch.float32, True)
    with torch.autocast("cpu", dtype=torch.float16):
        y = fused_linear(x, w, b, "gelu")
        ref = torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b))
    assert y.dtype == ref.dtype == torch.float16
    torch.testing.assert_close(y.float(), ref.float(), atol=4e-3, rtol=4e-3)
    y.float().sum().backward()
    assert x.grad.dtype == w.grad.dtype == b.grad.dtype == torch.float32


def test_gemm_autotune_keys_on_bucketed_sizes():
    """Pack lengths 1100 and 2048 share one autotune entry; the raw M and K are not in the key."""
    assert projector.tune_bucket(1100) == projector.tune_bucket(2048) == 2048
    assert projector.tune_bucket(1) == 16 and projector.tune_bucket(2049) == 4096
    assert "M" not in projector.TUNE_KEY and "K" not in projector.TUNE_KEY
    assert {"M_BUCKET", "K_BUCKET"} <= set(projector.TUNE_KEY) <= set(projector._matmul_kernel.arg_names) | {
        "ACCUMULATE"}

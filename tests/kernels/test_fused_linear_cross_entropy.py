"""Fused linear cross-entropy (kernels/fused_linear_cross_entropy.py) against the naive reference (fp32 logits +
F.cross_entropy) and its autograd gradients. Both implementations of the chunked algorithm are checked: the Triton
path (interpreted on CPU) and the chunked PyTorch path that CPU tensors take by default.

Shapes: V=2500 is not a multiple of the 2048-wide vocabulary block (two blocks, the second ragged) nor of the GEMM
tiles; N=37 with chunk_size=16 gives chunks of 16, 16 and 5 tokens.
Tolerances: fp32 loss rtol 1e-5, gradients atol 1e-6 (gradients are ~1e-2 per element with "mean");
fp16/bf16 against the fp32 reference on the same half-representable inputs: loss rtol 2e-3 / 1e-2, gradients
rtol 2e-2 / 5e-2 with atol 2e-2 / 5e-2 times the largest reference gradient (the products round operands to fp16
(bf16) and the gradients are stored in that dtype).
"""
import importlib

import pytest
import torch

from gmaivl_rt.kernels._dispatch import kernels
from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference

flce = importlib.import_module("gmaivl_rt.kernels.fused_linear_cross_entropy")

N, H, V, CHUNK = 37, 32, 2500, 16
TOL = {torch.float32: (1e-5, 1e-6, 1e-5), torch.float16: (2e-3, 2e-2, 2e-2), torch.bfloat16: (1e-2, 5e-2, 5e-2)}


def _inputs(dtype, n=N, v=V, ignored_every=5, weight_grad=True):
    hidden = torch.randn(n, H).to(dtype).requires_grad_()
    weight = (torch.randn(v, H) / H**0.5).to(dtype).requires_grad_(weight_grad)
    labels = torch.randint(0, v, (n,))
    if ignored_every:
        labels[::ignored_every] = -100
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, upstream=1.0, **kw):
    h = hidden.detach().clone().requires_grad_(hidden.requires_grad)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = fn(h, w, labels, **kw)
    (loss * upstream).backward()
    return loss.detach(), h.grad, w.grad


def _check(hidden, weight, labels, reduction, dtype, **kw):
    loss, gh, gw = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, upstream=1.5,
                                   reduction=reduction, chunk_size=CHUNK, **kw)
    ref_loss, ref_gh, ref_gw = _loss_and_grads(fused_linear_cross_entropy_reference, hidden.float(),
                                               weight.float(), labels, upstream=1.5, reduction=reduction, **kw)
    loss_rtol, grad_rtol, grad_atol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref_loss, rtol=loss_rtol, atol=0)
    assert gh.dtype == dtype
    torch.testing.assert_close(gh.float(), ref_gh, rtol=grad_rtol, atol=grad_atol * ref_gh.abs().max().item())
    if weight.requires_grad:
        assert gw.dtype == dtype
        torch.testing.assert_close(gw.float(), ref_gw, rtol=grad_rtol, atol=grad_atol * ref_gw.abs().max().item())
    else:
        assert gw is None


# ---------------------------------------------------------------------------------------------- Triton path
@pytest.mark.parametrize("dtype,reduction", [(torch.float32, "mean"), (torch.float16, "sum")])
def test_triton_matches_reference(triton_path, dtype, reduction):
    hidden, weight, labels = _inputs(dtype)
    _check(hidden, weight, labels, reduction, dtype)


def test_triton_frozen_weight_and_custom_ignore_index(triton_path):
    hidden, weight, labels = _inputs(torch.float32, n=20, weight_grad=False, ignored_every=0)
    labels[3:7] = 7  # a custom ignore_index that is also a valid class id
    _check(hidden, weight, labels, "mean", torch.float32, ignore_index=7)


def test_triton_all_ignored_gives_zero_loss_and_grads(triton_path):
    hidden, weight, labels = _inputs(torch.float32, n=9)
    labels[:] = -100
    loss, gh, gw = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, chunk_size=4)
    # torch's F.cross_entropy returns NaN here; we document 0 with zero gradients
    assert loss.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0


# ---------------------------------------------------------------------------------------------- chunked torch path
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_torch_chunked_matches_reference(torch_path, dtype, reduction):
    hidden, weight, labels = _inputs(dtype)
    _check(hidden, weight, labels, reduction, dtype)


def test_torch_chunked_frozen_weight(torch_path):
    hidden, weight, labels = _inputs(torch.float32, weight_grad=False)
    _check(hidden, weight, labels, "sum", torch.float32)


def test_torch_chunked_all_ignored(torch_path):
    hidden, weight, labels = _inputs(torch.float32, n=9)
    labels[:] = -100
    for reduction in ("mean", "sum"):
        loss, gh, gw = _loss_and_grads(fused_linear_cross_entropy, hidden, weight, labels, reduction=reduction,
                                       chunk_size=4)
        assert loss.item() == 0.0
        assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
    ref = fused_linear_cross_entropy_reference(hidden, weight, labels, reduction="sum")
    assert ref.item() == 0.0


def test_cpu_auto_takes_the_chunked_path(monkeypatch):
    """On CPU tensors in `auto` mode the loss never builds (N, V) logits: only (chunk, V) buffers."""
    monkeypatch.setenv("GMAIVL_KERNELS", "auto")
    seen = []
    step = flce._chunk_step_torch

    def recording_step(h, weight, labels, logits, *args):
        seen.append(tuple(logits.shape))
        return step(h, weight, labels, logits, *args)

    monkeypatch.setattr(flce, "_chunk_step_torch", recording_step)
    hidden, weight, labels = _inputs(torch.float32)
    _check(hidden, weight, labels, "mean", torch.float32)
    assert seen == [(16, V), (16, V), (5, V)]


def test_no_grad_computes_no_gradients(torch_path, monkeypatch):
    """An eval loss under torch.no_grad skips the gradient GEMMs (the parameters still require grad)."""
    grads_asked = []
    step = flce._chunk_step_torch

    def recording_step(*args):
        grads_asked.append((args[7] is not None, args[8] is not None))  # grad_hidden, grad_weight
        return step(*args)

    monkeypatch.setattr(flce, "_chunk_step_torch", recording_step)
    hidden, weight, labels = _inputs(torch.float32)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK)
    assert grads_asked == [(False, False)] * 3
    torch.testing.assert_close(loss, fused_linear_cross_entropy_reference(hidden, weight, labels), rtol=1e-5, atol=0)


def test_chunk_rows_rule():
    # InternLM2-7B head on 8192 tokens: Liger's rule gives 512 rows; small hidden sizes are lifted to 256 rows
    assert flce.chunk_rows(8192, 92544, 4096) == 512
    assert flce.chunk_rows(2048, 92544, 256) == 256
    assert flce.chunk_rows(10, 92544, 256) == 10


def test_fused_linear_cross_entropy_rejects_bad_input(torch_path):
    hidden, weight, labels = _inputs(torch.float32, n=4)
    with pytest.raises(ValueError, match="labels outside"):
        fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, V, -100]))
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(hidden, weight, labels, reduction="none")
    with pytest.raises(TypeError, match="float16"):
        fused_linear_cross_entropy(hidden.half(), weight, labels)
    with pytest.raises(ValueError, match="must be"):
        fused_linear_cross_entropy(hidden, weight[:, :5], labels)
    with pytest.raises(ValueError, match="labels"):
        fused_linear_cross_entropy(hidden, weight, labels[:3])


def test_report_specs():
    specs = flce.report_specs()
    kernels = {s.kernel for s in specs}
    assert {"flce_logits", "flce_grad_hidden", "flce_grad_weight", "flce_softmax_grad"} <= kernels
    assert all(s.uses_dot for s in specs if s.kernel != "flce_softmax_grad")
    for name in kernels:
        assert sum(s.default for s in specs if s.kernel == name) == 1


def test_follows_autocast(torch_path):
    # Like lm_head's F.linear under autocast: operands cast to bf16, loss still fp32, fp32 leaves get fp32 grads.
    hidden, weight, labels = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, labels, chunk_size=CHUNK)
        ref = fused_linear_cross_entropy_reference(hidden, weight, labels)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref, rtol=1e-2, atol=0)
    loss.backward()
    assert hidden.grad.dtype == weight.grad.dtype == torch.float32


@pytest.mark.parametrize("mode", ["triton", "torch"])
def test_fp16_loss_gradient_does_not_underflow(mode):
    """fp16, one logit 12 above the rest: every other softmax entry is ~6e-6, and times 1/n_valid (256 tokens) ~2e-8,
    below half of fp16's smallest subnormal (6e-8). Scaling before the fp16 cast flushed those entries, zeroing the
    grad_weight rows of every token that is neither the label nor the favourite (~6e-6 each, representable in
    fp16). Both paths now scale in fp32 after the GEMMs; checked against fp32 autograd on the same fp16 values."""
    n, h, v = 256, 16, 256
    hidden = (1.0 + 0.1 * torch.randn(n, h)).half()
    weight = 0.01 * torch.randn(v, h)
    weight[0] = 12.0 / h  # logit 0 ~ 12, the others ~ 0
    weight = weight.half()
    labels = torch.randint(1, 8, (n,))
    hid, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with kernels(mode):
        fused_linear_cross_entropy(hid, w, labels).backward()
    hid_ref, w_ref = hidden.float().requires_grad_(), weight.float().requires_grad_()
    fused_linear_cross_entropy_reference(hid_ref, w_ref, labels).backward()
    for name, got, ref in (("grad_weight", w.grad, w_ref.grad), ("grad_hidden", hid.grad, hid_ref.grad)):
        err = (got.float() - ref).abs().max() / ref.abs().max()
        assert err < 1e-2, f"{name}: max error {err:.3g} of the largest gradient"
    rest, rest_ref = w.grad[8:].float(), w_ref.grad[8:]  # rows of tokens never the label nor the favourite
    assert float(rest_ref.abs().min()) > 1e-6
    torch.testing.assert_close(rest, rest_ref, rtol=5e-2, atol=float(rest_ref.abs().max()) * 2e-2)


def test_cuda_loss_chunk_comes_from_a_memory_budget():
    """The trainer's pack (2048 tokens, V=92544) is one chunk on CUDA with the default 2 GiB budget; a tight budget
    still keeps 1024-row chunks; CPU keeps Liger's rule."""
    assert flce.chunk_rows(2048, 92544, 4096, budget_bytes=flce.CUDA_LOGITS_BUDGET_BYTES) == 2048
    assert flce.chunk_rows(8192, 92544, 4096, budget_bytes=flce.CUDA_LOGITS_BUDGET_BYTES) == 5760
    assert flce.chunk_rows(8192, 92544, 4096, budget_bytes=100 << 20) == 1024
    assert flce.chunk_rows(8192, 92544, 4096) == 512


@pytest.mark.parametrize("mode", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_chunk_writes_grad_weight_directly(mode, dtype):
    """One chunk (no fp32 dW accumulator, the GEMM stores dW in the weight's dtype) and several chunks agree with
    autograd through the materialised logits."""
    hidden, weight = torch.randn(37, 16).to(dtype), (torch.randn(50, 16) / 4).to(dtype)
    labels = torch.randint(0, 50, (37,))
    labels[::5] = -100
    ref_h, ref_w = hidden.float().clone().requires_grad_(), weight.float().clone().requires_grad_()
    fused_linear_cross_entropy_reference(ref_h, ref_w, labels).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for chunk in (37, 16):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        with kernels(mode):
            fused_linear_cross_entropy(h, w, labels, chunk_size=chunk).backward()
        assert w.grad.dtype == dtype
        torch.testing.assert_close(w.grad.float(), ref_w.grad, atol=tol, rtol=tol)
        torch.testing.assert_close(h.grad.float(), ref_h.grad, atol=tol, rtol=tol)

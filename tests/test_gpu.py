"""Compiled Triton kernels on a real GPU against the PyTorch references, in bf16 and fp16: the tensor-core paths
the interpreter cannot run. Skipped (with the reason) without CUDA, and when TRITON_INTERPRET is on, which the
rest of the suite needs; run them on a GPU machine with `TRITON_INTERPRET=0 pytest tests/test_gpu.py`.
Tolerances (max abs error against the fp32 reference on the same rounded inputs): fp16 2e-2, bf16 6e-2 for
forwards; gradients 5e-2 / 1.5e-1 (relative to each tensor's scale). The fp16 cases were checked to pass on CPU
under the interpreter (bf16 cannot be: the interpreter has no bf16 arithmetic); on a GPU they have not run yet."""
import pytest
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig, kernels
from gmaivl_rt.kernels import kernels as kernel_mode

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(kernels.interpreting(), reason="TRITON_INTERPRET is set: run with TRITON_INTERPRET=0"),
]
DTYPES = [torch.float16, torch.bfloat16]
FWD_TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2}
GRAD_TOL = {torch.float16: 5e-2, torch.bfloat16: 1.5e-1}


def _compare(fn, reference, inputs, dtype):
    """fn on (dtype) CUDA inputs vs reference on their fp32 copies: outputs and input gradients."""
    low = [x.to("cuda", dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    high = [x.detach().float().requires_grad_(x.is_floating_point()) for x in low]
    out, ref = fn(*low), reference(*high)
    torch.testing.assert_close(out.float(), ref, atol=FWD_TOL[dtype], rtol=FWD_TOL[dtype])
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for a, b in zip(low, high):
        if a.grad is not None:
            scale = max(1.0, float(b.grad.abs().max()))
            torch.testing.assert_close(a.grad.float(), b.grad, atol=GRAD_TOL[dtype] * scale, rtol=GRAD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_attention_packed_gqa(dtype, causal):
    lengths = [1, 17, 127, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = torch.randn(sum(lengths), 8, 128), torch.randn(sum(lengths), 2, 128), torch.randn(sum(lengths), 2, 128)
    _compare(lambda q, k, v: kernels.attention(q, k, v, causal=causal, cu_seqlens=cu),
             lambda q, k, v: kernels.attention_reference(q, k, v, causal=causal, cu_seqlens=cu), [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_decode_attention(dtype):
    q, cache_k, cache_v = torch.randn(3, 8, 128), torch.randn(3, 1000, 2, 128), torch.randn(3, 1000, 2, 128)
    seqlens = torch.tensor([1, 517, 1000], dtype=torch.int32, device="cuda")
    low = [x.to("cuda", dtype) for x in (q, cache_k, cache_v)]
    out = kernels.decode_attention(*low, seqlens)
    ref = kernels.decode_attention_reference(*[x.float() for x in low], seqlens)
    torch.testing.assert_close(out.float(), ref, atol=FWD_TOL[dtype], rtol=FWD_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
def test_projector_and_row_ops(dtype):
    x, w1, b1 = torch.randn(300, 1024), torch.randn(4096, 1024) / 32, torch.randn(4096)
    _compare(lambda x, w, b: kernels.fused_linear(x, w, b, "gelu"),
             lambda x, w, b: kernels.fused_linear_reference(x, w, b, "gelu"), [x, w1, b1], dtype)
    h, weight = torch.randn(257, 4096), torch.ones(4096) + 0.1 * torch.randn(4096)
    _compare(lambda h, w: kernels.rms_norm(h, w, 1e-5), lambda h, w: kernels.rms_norm_reference(h, w, 1e-5),
             [h, weight], dtype)
    _compare(kernels.swiglu, kernels.swiglu_reference, [torch.randn(257, 1000), torch.randn(257, 1000)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_linear_cross_entropy(dtype):
    hidden, weight = torch.randn(1000, 512), torch.randn(32000, 512) / 23
    labels = torch.randint(0, 32000, (1000,), device="cuda")
    labels[::5] = -100
    _compare(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels),
             lambda h, w: kernels.fused_linear_cross_entropy_reference(h, w, labels), [hidden, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_tiny_model_triton_matches_torch(dtype):
    torch.manual_seed(0)
    model = GMAIVL(GMAIVLConfig.preset("tiny")).to("cuda", dtype)
    cfg = model.config
    ids = torch.tensor([[3, 4] + [cfg.image_token_index] * cfg.num_image_tokens + list(range(10, 40))], device="cuda")
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size, device="cuda", dtype=dtype)
    logits = {}
    for mode in ("torch", "triton"):
        with kernel_mode(mode), torch.no_grad():
            logits[mode] = model(ids, pixel_values=pixels).logits.float()
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=FWD_TOL[dtype], rtol=FWD_TOL[dtype])

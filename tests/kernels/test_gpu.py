"""Compiled Triton kernels on a real GPU against fp32 PyTorch references, in bf16 and fp16: the tensor-core paths
the interpreter cannot run.

The rest of the suite needs TRITON_INTERPRET=1 (tests/conftest.py sets it before triton is imported), so under
`make test` on a CUDA machine `test_compiled_kernels_in_a_clean_process` runs this file again in a subprocess with
TRITON_INTERPRET=0 and fails if any of its tests fails or skips; the kernel tests themselves skip in the
interpreted process. Without CUDA everything skips with the reason.

Tolerances come from each tensor's own scale: the relative error norm ||got - want|| / ||want|| against the fp32
reference on the same rounded inputs, fp16 3e-3 and bf16 2e-2, and the largest elementwise error within MAX_REL
of the tensor's largest value. Rounding the outputs alone to the format costs 2-3e-4 (fp16) and 1.7-2.3e-3 (bf16)
in that norm (measured on CPU for LayerNorm, RoPE and patch embedding at these shapes, max error 2x that); the
bounds leave ~10x for fp32-accumulated reductions and tensor-core products. Not yet run on a GPU.
An all-zero or badly scaled gradient has a relative error of ~1 and fails.
"""
import os
import subprocess
import sys

import pytest
import torch

from gmaivl_rt import GMAIVL, GMAIVLConfig

from gmaivl_rt.model import ops as kernels
from gmaivl_rt.kernels._dispatch import kernels as kernel_mode

HAS_CUDA = torch.cuda.is_available()
compiled = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device"),
    pytest.mark.skipif(kernels.interpreting(), reason="TRITON_INTERPRET is set: these run in the clean subprocess "
                                                       "of test_compiled_kernels_in_a_clean_process"),
]
DTYPES = [torch.float16, torch.bfloat16]


def compiled_marks(test):
    for mark in compiled:
        test = mark(test)
    return test

REL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}
MAX_REL = {torch.float16: 1.5e-2, torch.bfloat16: 6e-2}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
@pytest.mark.skipif(not kernels.interpreting(), reason="already compiled: the kernel tests below run here")
def test_compiled_kernels_in_a_clean_process():
    env = dict(os.environ, TRITON_INTERPRET="0")
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", __file__],
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    assert " skipped" not in run.stdout.splitlines()[-1], run.stdout[-3000:]


def assert_close_to_reference(got, want, dtype, what="output"):
    """got (dtype, any device) vs want (fp32): relative error norm <= REL[dtype], max error <= MAX_REL * max|want|."""
    got, want = got.float(), want.float()
    scale = float(want.norm())
    assert scale > 0, f"{what}: the reference is all zeros, the check would prove nothing"
    rel = float((got - want).norm()) / scale
    worst = float((got - want).abs().max())
    assert rel <= REL[dtype], f"{what}: relative error norm {rel:.2e} > {REL[dtype]:.0e}"
    assert worst <= MAX_REL[dtype] * float(want.abs().max()), f"{what}: max error {worst:.2e}"


def _compare(fn, reference, inputs, dtype):
    """fn on (dtype) CUDA inputs vs reference on their fp32 copies: outputs and every input gradient."""
    low = [x.to("cuda", dtype).requires_grad_(x.is_floating_point()) for x in inputs]
    high = [x.detach().float().requires_grad_(x.is_floating_point()) for x in low]
    out, ref = fn(*low), reference(*high)
    assert out.dtype == dtype
    assert_close_to_reference(out, ref, dtype)
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    for i, (a, b) in enumerate(zip(low, high)):
        if b.grad is not None:
            assert a.grad is not None, f"input {i}: no gradient"
            assert_close_to_reference(a.grad, b.grad, dtype, f"gradient of input {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
@pytest.mark.parametrize("causal", [False, True])
def test_attention_packed_gqa(dtype, causal):
    lengths = [1, 17, 127, 300]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    q, k, v = torch.randn(sum(lengths), 8, 128), torch.randn(sum(lengths), 2, 128), torch.randn(sum(lengths), 2, 128)
    _compare(lambda q, k, v: kernels.attention(q, k, v, causal=causal, cu_seqlens=cu),
             lambda q, k, v: kernels.attention_reference(q, k, v, causal=causal, cu_seqlens=cu), [q, k, v], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
def test_decode_attention(dtype):
    q, cache_k, cache_v = torch.randn(3, 8, 128), torch.randn(3, 1000, 2, 128), torch.randn(3, 1000, 2, 128)
    seqlens = torch.tensor([1, 517, 1000], dtype=torch.int32, device="cuda")
    low = [x.to("cuda", dtype) for x in (q, cache_k, cache_v)]
    out = kernels.decode_attention(*low, seqlens)
    ref = kernels.decode_attention_reference(*[x.float() for x in low], seqlens)
    assert_close_to_reference(out, ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
def test_projector_and_row_ops(dtype):
    x, w1, b1 = torch.randn(300, 1024), torch.randn(4096, 1024) / 32, torch.randn(4096)
    _compare(lambda x, w, b: kernels.fused_linear(x, w, b, "gelu"),
             lambda x, w, b: kernels.fused_linear_reference(x, w, b, "gelu"), [x, w1, b1], dtype)
    h, weight = torch.randn(257, 4096), torch.ones(4096) + 0.1 * torch.randn(4096)
    _compare(lambda h, w: kernels.rms_norm(h, w, 1e-5), lambda h, w: kernels.rms_norm_reference(h, w, 1e-5),
             [h, weight], dtype)
    _compare(kernels.swiglu, kernels.swiglu_reference, [torch.randn(257, 1000), torch.randn(257, 1000)], dtype)
    bias = 0.1 * torch.randn(1024)
    _compare(lambda h, w, b: kernels.layer_norm(h, w, b, 1e-5), lambda h, w, b: kernels.layer_norm_reference(h, w, b, 1e-5),
             [torch.randn(257, 1024), torch.ones(1024) + 0.1 * torch.randn(1024), bias], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
def test_rope(dtype):
    positions = torch.arange(300).repeat(2, 1)
    cos, sin = kernels.rope_cos_sin(positions, 128, 1_000_000.0)

    def rotate(rope):
        return lambda q, k: torch.cat([t.flatten() for t in rope(q, k, cos.to(q), sin.to(q))])

    _compare(rotate(kernels.apply_rope), rotate(kernels.apply_rope_reference),
             [torch.randn(2, 300, 8, 128), torch.randn(2, 300, 2, 128)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
def test_patch_embed(dtype):
    """Two 336x336 images and one 224x336 (a CLIP ViT-L/14 grid and a smaller one): embeddings and the gradients
    of the conv weight, CLS and position embeddings."""
    images = [torch.randn(3, 336, 336), torch.randn(3, 336, 336), torch.randn(3, 224, 336)]

    def embed(fn):
        return lambda w, cls, pos: fn([img.to("cuda", w.dtype) for img in images], w, None, cls, pos)[0]

    _compare(embed(kernels.patch_embed), embed(kernels.patch_embed_reference),
             [torch.randn(1024, 3, 14, 14) / 24, torch.randn(1024), torch.randn(577, 1024)], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
def test_fused_linear_cross_entropy(dtype):
    hidden, weight = torch.randn(1000, 512), torch.randn(32000, 512) / 23
    labels = torch.randint(0, 32000, (1000,), device="cuda")
    labels[::5] = -100
    _compare(lambda h, w: kernels.fused_linear_cross_entropy(h, w, labels),
             lambda h, w: kernels.fused_linear_cross_entropy_reference(h, w, labels), [hidden, weight], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@compiled_marks
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
    assert_close_to_reference(logits["triton"], logits["torch"], dtype, "logits")

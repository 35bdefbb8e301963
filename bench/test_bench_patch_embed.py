"""Patch embedding on a GPU: the Triton kernel (patch gather + GEMM + bias/position epilogue in one launch) vs the
PyTorch path CLIP takes (normalise, cuDNN conv, add interpolated position embeddings, cat CLS), in TFLOP/s of the
patch GEMM, forward and forward+backward, bf16. Shapes: 8 images at 336x336 (fixed GMAI-VL) and 8 images of mixed
aspect ratios (dynamic resolution). Ratios go to extra_info; no timing assertions. Skips without CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gmaivl_rt.kernels import interpolate_position_embedding, kernels, patch_embed

pytestmark = pytest.mark.gpu

PATCH, HIDDEN, GRID = 14, 1024, 24
SIZES = {"fixed_8x336": [(336, 336)] * 8,
         "dynamic_8_mixed": [(336, 336), (224, 448), (448, 224), (504, 336), (168, 672), (392, 392), (280, 420),
                             (336, 504)]}
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def _conv_path(images, weight, class_embedding, position_embedding, mean, std):
    """What CLIPVisionEmbeddings does, image by image (sizes differ)."""
    out = []
    cls = (class_embedding + position_embedding[0])[None]
    for img in images:
        x = (img - mean[:, None, None]) / std[:, None, None]
        emb = F.conv2d(x[None], weight, stride=PATCH)[0].flatten(1).T
        emb = emb + interpolate_position_embedding(position_embedding, img.shape[1] // PATCH, img.shape[2] // PATCH)
        out.append(torch.cat([cls, emb]))
    return torch.cat(out)


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("case", list(SIZES))
def test_patch_embed_vs_conv(benchmark, cuda_ms, tflops, case, backward):
    dtype, device = torch.bfloat16, "cuda"
    images = [torch.rand(3, h, w, device=device, dtype=dtype) for h, w in SIZES[case]]
    mean, std = (torch.tensor(v, device=device, dtype=dtype) for v in (MEAN, STD))
    params = [torch.randn(HIDDEN, 3, PATCH, PATCH, device=device, dtype=dtype) * 0.02,
              torch.randn(HIDDEN, device=device, dtype=dtype), torch.randn(1 + GRID * GRID, HIDDEN, device=device,
                                                                             dtype=dtype)]
    for p in params:
        p.requires_grad_(backward)
    rows = sum(h * w for h, w in SIZES[case]) // PATCH**2
    flops = 2.0 * rows * HIDDEN * 3 * PATCH * PATCH * (2 if backward else 1)  # bwd: dWeight (images need no grad)

    def ours():
        with kernels("triton"):
            out = patch_embed(images, params[0], None, params[1], params[2], mean=mean, std=std)[0]
        if backward:
            out.backward(torch.ones_like(out))

    def conv():
        out = _conv_path(images, *params, mean, std)
        if backward:
            out.backward(torch.ones_like(out))

    ours_ms, conv_ms = cuda_ms(ours), cuda_ms(conv)
    benchmark.pedantic(ours, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(ours_ms=ours_ms, conv_ms=conv_ms, ours_tflops=tflops(flops, ours_ms),
                                conv_tflops=tflops(flops, conv_ms), speedup_vs_conv=conv_ms / ours_ms)
    print(f"\n{benchmark.name}: ours {ours_ms:.3f} ms ({tflops(flops, ours_ms):.1f} TFLOP/s), conv path "
          f"{conv_ms:.3f} ms, speedup {conv_ms / ours_ms:.2f}x")

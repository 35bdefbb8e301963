"""Patch embedding on a GPU: the Triton kernel (patch gather + GEMM + bias/position epilogue in one launch) vs the
batched PyTorch path (normalise, one cuDNN conv for all images, add position embeddings, cat CLS), in TFLOP/s of the
patch GEMM, forward and forward+backward, bf16. Shapes: 8 images at 336x336 (fixed GMAI-VL: one (8, 3, 336, 336)
conv, as CLIPVisionEmbeddings runs it) and 8 images of mixed aspect ratios (dynamic resolution: CLIP cannot batch
different sizes, so every image's patches are stacked and one conv runs over all of them, as Qwen2-VL's PatchEmbed
does; the position table is interpolated once per distinct grid). Both sides are checked to compute the same
embeddings and warmed up before timing. Ratios go to extra_info; no timing assertions. Skips without CUDA."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gmaivl_rt.kernels.patch_embed import interpolate_position_embedding, patch_embed

from gmaivl_rt.kernels._dispatch import kernels
from gmaivl_rt.kernels.patch_embed import patchify

pytestmark = pytest.mark.gpu

PATCH, HIDDEN, GRID = 14, 1024, 24
SIZES = {"fixed_8x336": [(336, 336)] * 8,
         "dynamic_8_mixed": [(336, 336), (224, 448), (448, 224), (504, 336), (168, 672), (392, 392), (280, 420),
                             (336, 504)]}
MEAN, STD = (0.481, 0.458, 0.408), (0.269, 0.261, 0.276)


def _conv_path(images, weight, class_embedding, position_embedding, mean, std):
    """The embeddings of `patch_embed` (packed (T, C), CLS first per image) with one batched convolution."""
    cls = (class_embedding + position_embedding[0])[None]
    hidden = weight.shape[0]
    if all(img.shape == images[0].shape for img in images):  # CLIPVisionEmbeddings: one conv over the batch
        x = (torch.stack(images) - mean[:, None, None]) / std[:, None, None]
        emb = F.conv2d(x, weight, stride=PATCH).flatten(2).transpose(1, 2)  # (N, gh*gw, C)
        _, gh, gw = (s // PATCH for s in images[0].shape)
        emb = emb + interpolate_position_embedding(position_embedding, gh, gw)
        return torch.cat([cls.expand(len(images), 1, hidden), emb], dim=1).reshape(-1, hidden)
    # Mixed sizes: every image's patches as one (T, 3, P, P) stack, one conv (a GEMM) over all of them.
    patches = torch.cat([patchify((img - mean[:, None, None]) / std[:, None, None], PATCH) for img in images])
    emb = F.conv2d(patches.reshape(-1, 3, PATCH, PATCH), weight, stride=PATCH).flatten(1)  # (T, C)
    grids = [(img.shape[1] // PATCH, img.shape[2] // PATCH) for img in images]
    positions = {g: interpolate_position_embedding(position_embedding, *g) for g in dict.fromkeys(grids)}
    out, start = [], 0
    for g in grids:
        count = g[0] * g[1]
        out += [cls, emb[start:start + count] + positions[g]]
        start += count
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

    with torch.no_grad(), kernels("triton"):  # same work: the baseline computes the kernel's embeddings
        got = patch_embed(images, params[0], None, params[1], params[2], mean=mean, std=std)[0].float()
        want = _conv_path(images, *params, mean, std).float()
    assert got.shape == want.shape and (got - want).abs().max() <= 0.05 * want.abs().max()
    ours_ms, conv_ms = cuda_ms(ours), cuda_ms(conv)  # each warmed up (10 calls) before its timed calls
    benchmark.pedantic(ours, rounds=20, warmup_rounds=3)
    benchmark.extra_info.update(ours_ms=ours_ms, conv_ms=conv_ms, ours_tflops=tflops(flops, ours_ms),
                                conv_tflops=tflops(flops, conv_ms), speedup_vs_conv=conv_ms / ours_ms)
    print(f"\n{benchmark.name}: ours {ours_ms:.3f} ms ({tflops(flops, ours_ms):.1f} TFLOP/s), conv path "
          f"{conv_ms:.3f} ms, speedup {conv_ms / ours_ms:.2f}x")

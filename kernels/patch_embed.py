"""Dynamic-resolution patch embedding for the CLIP vision tower.

Images of different sizes (sides multiples of the patch size) -> normalise (optional) -> patchify -> GEMM with
the patch weight (+ bias) -> + position embeddings bicubically interpolated from the trained grid to each
image's grid (CLIP's `interpolate_pos_encoding`), each image prefixed by its CLS token, all packed into one
(total_tokens, hidden) buffer with cu_seqlens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def patch_embed(images, weight, bias, class_embedding, position_embedding, *, mean=None, std=None):
    """images: a (N, 3, H, W) tensor or a list of (3, H_i, W_i) tensors, H_i and W_i multiples of the patch size;
    weight: (C, 3, P, P) conv weight; bias: (C,) or None; class_embedding: (C,);
    position_embedding: (1 + G*G, C) trained for a G x G grid; mean, std: (3,) or None (images already normalised).
    Returns (embeddings (T, C) in weight's dtype, cu_seqlens (N + 1,) int32, grid_sizes (N, 2) int64 rows (gh, gw));
    each image contributes 1 + gh*gw tokens (CLS first)."""
    images = list(images)
    patch = weight.shape[-1]
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[0] != weight.shape[1] or img.shape[1] % patch or img.shape[2] % patch:
            raise ValueError(f"patch_embed: image {i} has shape {tuple(img.shape)}; expected (3, H, W) with H and "
                             f"W multiples of the patch size {patch}")
    if use_triton(weight, *images):
        return _patch_embed_triton(images, weight, bias, class_embedding, position_embedding, mean, std)
    return patch_embed_reference(images, weight, bias, class_embedding, position_embedding, mean=mean, std=std)


def interpolate_position_embedding(position_embedding, grid_h, grid_w):
    """(1 + G*G, C) -> (grid_h * grid_w, C) patch position embeddings, bicubic as CLIP's interpolate_pos_encoding."""
    patch_pos = position_embedding[1:]
    side = math.isqrt(patch_pos.shape[0])
    if (grid_h, grid_w) == (side, side):
        return patch_pos
    grid = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(grid_h * grid_w, -1)


def patchify(image, patch):
    """(3, H, W) -> (gh*gw, 3*P*P), patches row-major, each flattened (channel, row, col) like a conv weight."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    return image.reshape(c, gh, patch, gw, patch).permute(1, 3, 0, 2, 4).reshape(gh * gw, c * patch * patch)


def patch_embed_reference(images, weight, bias, class_embedding, position_embedding, *, mean=None, std=None):
    patch = weight.shape[-1]
    w2d = weight.reshape(weight.shape[0], -1)
    pieces, lengths, grids = [], [0], []
    for img in images:
        x = img.to(weight.dtype)
        if mean is not None:
            x = (x - mean.to(x)[:, None, None]) / std.to(x)[:, None, None]
        gh, gw = x.shape[1] // patch, x.shape[2] // patch
        emb = F.linear(patchify(x, patch), w2d, bias)
        emb = emb + interpolate_position_embedding(position_embedding, gh, gw)
        cls = (class_embedding + position_embedding[0])[None]
        pieces.append(torch.cat([cls.to(emb.dtype), emb]))
        lengths.append(lengths[-1] + 1 + gh * gw)
        grids.append((gh, gw))
    device = weight.device
    return (torch.cat(pieces), torch.tensor(lengths, dtype=torch.int32, device=device),
            torch.tensor(grids, dtype=torch.int64, device=device).reshape(-1, 2))


def _patch_embed_triton(images, weight, bias, class_embedding, position_embedding, mean, std):
    raise NotImplementedError

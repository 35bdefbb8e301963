"""Several prompts as one batch, the layout every backend's `generate` (and the graph backends' `prefill`) takes:
left padding, so each row's last real token is the batch's last position. The evaluation runner and the serving
engine's static graph batches build their batches here."""
from __future__ import annotations

import torch


def left_padded_batch(rows, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """rows: the token ids of each prompt (lists of int or 1-D integer tensors), at least one; pad_id: the id put
    before the shorter rows. Returns (input_ids (B, W) int64, attention_mask (B, W) int64: 1 on each row's tokens,
    0 on its padding), W the longest row's length."""
    rows = [torch.as_tensor(row, dtype=torch.int64) for row in rows]
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)
    for r, row in enumerate(rows):
        input_ids[r, width - len(row):] = row
        mask[r, width - len(row):] = 1
    return input_ids, mask


def pixel_batch(images: list, dynamic_resolution: bool):
    """images: one (3, H, W) float32 tensor per image, in the order of the image tokens (row by row) ->
    `pixel_values` as `generate` takes it: (N, 3, H, W) stacked, the list itself in dynamic-resolution mode (sizes
    differ), or None without images."""
    if not images:
        return None
    return list(images) if dynamic_resolution else torch.stack(list(images))

"""Soft packing: whole samples laid end to end in sequences of at most `max_length` tokens, no padding.

The packed attention kernel keeps samples apart through `cu_seqlens` (block-diagonal causal attention), RoPE
positions restart at 0 in each sample, and the model's loss shift never crosses a sample boundary, so a pack trains
exactly like its samples run one by one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch


@dataclass
class Pack:
    """Indices of the samples in one packed sequence, in order, and their total length."""
    sample_indices: list[int] = field(default_factory=list)
    length: int = 0


def pack_samples(lengths: Sequence[int], max_length: int, open_packs: int = 64) -> list[Pack]:
    """Greedy first-fit: each sample goes into the first open pack with room, else starts a new one.

    lengths: tokens per sample, each at most `max_length` (truncate first). open_packs: how many of the most
    recent packs stay open for filling (keeps packing O(n * open_packs) on millions of samples).
    Returns packs in creation order; no sample is split and every sample lands in exactly one pack.
    """
    if max_length <= 0:
        raise ValueError(f"pack_samples: max_length must be positive, got {max_length}")
    packs: list[Pack] = []
    first_open = 0
    for index, n in enumerate(lengths):
        if n <= 0 or n > max_length:
            raise ValueError(f"pack_samples: sample {index} has {n} tokens; each must be in 1..{max_length} "
                             "(truncate long samples before packing)")
        for pack in packs[first_open:]:
            if pack.length + n <= max_length:
                pack.sample_indices.append(index)
                pack.length += n
                break
        else:
            packs.append(Pack([index], n))
            first_open = max(0, len(packs) - open_packs)
    return packs


def collate_pack(samples, images: list[torch.Tensor], fixed_size: bool = True) -> dict:
    """One pack -> the model's packed inputs.

    samples: objects with int32 `input_ids`/`labels` arrays (L_i,). images: (3, H, W) float tensors in sample order.
    Returns input_ids, labels, position_ids: int64 (1, T), T = sum L_i; cu_seqlens: int32 (n + 1,);
    pixel_values: (n_images, 3, S, S) float32 (fixed size), a list of (3, H_i, W_i) (dynamic), or None.
    """
    lengths = [len(s.input_ids) for s in samples]
    input_ids = torch.from_numpy(np.concatenate([s.input_ids for s in samples]).astype(np.int64))
    labels = torch.from_numpy(np.concatenate([s.labels for s in samples]).astype(np.int64))
    position_ids = torch.cat([torch.arange(n, dtype=torch.int64) for n in lengths])
    cu_seqlens = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.cumsum(torch.tensor(lengths, dtype=torch.int32), 0)
    if not images:
        pixel_values = None
    elif fixed_size:
        pixel_values = torch.stack(images)
    else:
        pixel_values = list(images)
    return {"input_ids": input_ids[None], "labels": labels[None], "position_ids": position_ids[None],
            "cu_seqlens": cu_seqlens, "pixel_values": pixel_values}

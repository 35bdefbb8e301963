"""Fused linear + cross-entropy: loss of (hidden @ weight.T) against labels without materialising the
(tokens, vocab) logits; tokens are processed in chunks and gradients computed in the forward pass."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import use_triton


def fused_linear_cross_entropy(hidden, weight, labels, *, ignore_index=-100, reduction="mean"):
    """hidden: (N, H); weight: (V, H); labels: (N,) int64 (already shifted), `ignore_index` skipped.
    reduction: "mean" (over non-ignored tokens) or "sum". Returns a 0-d fp32 tensor."""
    if use_triton(hidden, weight):
        return _flce_triton(hidden, weight, labels, ignore_index, reduction)
    return fused_linear_cross_entropy_reference(hidden, weight, labels, ignore_index=ignore_index,
                                                reduction=reduction)


def fused_linear_cross_entropy_reference(hidden, weight, labels, *, ignore_index=-100, reduction="mean"):
    """Naive: materialises the logits in fp32. The independent reference for tests."""
    logits = (hidden @ weight.T).float()
    return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)


def _flce_triton(hidden, weight, labels, ignore_index, reduction):
    raise NotImplementedError

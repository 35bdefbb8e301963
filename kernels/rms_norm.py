"""RMSNorm (Llama / InternLM2): y = weight * (x / sqrt(mean(x^2) + eps)), statistics in fp32."""
from __future__ import annotations

import torch

from ._dispatch import use_triton


def rms_norm(x, weight, eps=1e-6):
    """x: (..., H) any float dtype; weight: (H,). Returns x's shape, in x's dtype promoted with weight's."""
    if use_triton(x, weight):
        return _rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x, weight, eps=1e-6):
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def _rms_norm_triton(x, weight, eps):
    raise NotImplementedError

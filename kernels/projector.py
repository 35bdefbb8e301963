"""Projector GEMMs: linear with bias and GELU fused in the epilogue; the `mlp2x_gelu` projector."""
from __future__ import annotations

import torch.nn.functional as F

from ._dispatch import use_triton


def fused_linear(x, weight, bias=None, activation=None):
    """y = act(x @ weight.T + bias). x: (..., K); weight: (N, K); bias: (N,) or None;
    activation: None or "gelu" (exact, erf). Returns (..., N) in x's dtype."""
    if activation not in (None, "gelu"):
        raise ValueError(f"fused_linear: activation {activation!r} is not None or 'gelu'")
    if use_triton(x, weight):
        return _fused_linear_triton(x, weight, bias, activation)
    return fused_linear_reference(x, weight, bias, activation)


def fused_linear_reference(x, weight, bias=None, activation=None):
    y = F.linear(x, weight, bias)
    return F.gelu(y) if activation == "gelu" else y


def mlp2x_gelu(x, w1, b1, w2, b2):
    """LLaVA's projector: Linear -> GELU -> Linear. x: (..., C_vision) -> (..., C_text)."""
    return fused_linear(fused_linear(x, w1, b1, "gelu"), w2, b2)


def _fused_linear_triton(x, weight, bias, activation):
    raise NotImplementedError

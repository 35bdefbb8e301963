"""SwiGLU gate of the Llama / InternLM2 MLP: silu(gate) * up."""
from __future__ import annotations

import torch.nn.functional as F

from ._dispatch import use_triton


def swiglu(gate, up):
    """gate, up: (..., I), same shape and dtype. Returns silu(gate) * up."""
    if use_triton(gate, up):
        return _swiglu_triton(gate, up)
    return swiglu_reference(gate, up)


def swiglu_reference(gate, up):
    return F.silu(gate) * up


def _swiglu_triton(gate, up):
    raise NotImplementedError

"""Triton kernels on the hot paths, each beside its plain PyTorch reference (see `_dispatch` for which runs)."""
# `_dispatch` first: it sets Triton's FP-fusion knob (in that one place) before any kernel module imports triton.
from ._dispatch import interpreting, kernel_mode, kernels, triton_available, use_triton
from .attention import attention, attention_reference
from .decode_attention import decode_attention, decode_attention_reference
from .fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from .paged_decode_attention import paged_decode_attention, paged_decode_attention_reference
from .layer_norm import layer_norm, layer_norm_reference
from .patch_embed import interpolate_position_embedding, patch_embed, patch_embed_reference
from .projector import fused_linear, fused_linear_reference, mlp2x_gelu
from .rms_norm import rms_norm, rms_norm_reference
from .rope import apply_rope, apply_rope_reference, rope_cos_sin
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "attention", "attention_reference", "decode_attention", "decode_attention_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "layer_norm", "layer_norm_reference",
    "patch_embed", "patch_embed_reference", "interpolate_position_embedding", "fused_linear",
    "fused_linear_reference", "mlp2x_gelu", "rms_norm", "rms_norm_reference", "apply_rope", "apply_rope_reference",
    "rope_cos_sin", "swiglu", "swiglu_reference", "interpreting", "kernel_mode", "kernels", "triton_available",
    "use_triton", "paged_decode_attention", "paged_decode_attention_reference",
]

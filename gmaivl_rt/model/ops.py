"""The one door to the kernels: every op the model calls (each resolves to a Triton kernel or its PyTorch reference,
see `gmaivl_rt.kernels._dispatch`), the references beside them, and the dispatch controls. Kernels change without
the model changing; the top-level `kernels/` folder is imported only as `gmaivl_rt.kernels` (README, Architecture)."""
# `_dispatch` first: it sets Triton's FP-fusion knob (in that one place) before any kernel module imports triton.
from gmaivl_rt.kernels._dispatch import interpreting, kernel_mode, kernels, triton_available, use_triton
from gmaivl_rt.kernels.attention import attention, attention_reference
from gmaivl_rt.kernels.decode_attention import decode_attention, decode_attention_reference
from gmaivl_rt.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy, fused_linear_cross_entropy_reference
from gmaivl_rt.kernels.paged_decode_attention import (paged_decode_attention, paged_decode_attention_reference,
                                                      store_kv)
from gmaivl_rt.kernels.layer_norm import layer_norm, layer_norm_reference
from gmaivl_rt.kernels.patch_embed import interpolate_position_embedding, patch_embed, patch_embed_reference
from gmaivl_rt.kernels.projector import fused_linear, fused_linear_reference, mlp2x_gelu
from gmaivl_rt.kernels.rms_norm import rms_norm, rms_norm_reference
from gmaivl_rt.kernels.rope import apply_rope, apply_rope_reference, rope_cos_sin
from gmaivl_rt.kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "attention", "attention_reference", "decode_attention", "decode_attention_reference",
    "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "layer_norm", "layer_norm_reference",
    "patch_embed", "patch_embed_reference", "interpolate_position_embedding", "fused_linear",
    "fused_linear_reference", "mlp2x_gelu", "rms_norm", "rms_norm_reference", "apply_rope", "apply_rope_reference",
    "rope_cos_sin", "swiglu", "swiglu_reference", "interpreting", "kernel_mode", "kernels", "triton_available",
    "use_triton", "paged_decode_attention", "paged_decode_attention_reference", "store_kv",
]

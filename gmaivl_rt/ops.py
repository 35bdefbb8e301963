"""The one place the model calls its hot ops. Each resolves to a Triton kernel or its PyTorch reference
(see `gmaivl_rt.kernels._dispatch`), so kernels change without the model changing."""
from gmaivl_rt.kernels import (  # noqa: F401
    apply_rope,
    attention,
    decode_attention,
    fused_linear,
    fused_linear_cross_entropy,
    layer_norm,
    mlp2x_gelu,
    paged_decode_attention,
    patch_embed,
    rms_norm,
    rope_cos_sin,
    swiglu,
)

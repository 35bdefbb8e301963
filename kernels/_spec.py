"""What each kernel file declares so the GPU readiness report (`gmaivl-rt kernels report`) can compile it.

Every file with Triton kernels defines `report_specs() -> list[KernelSpec]`: one entry per (kernel, config) it can
launch with (every autotune candidate, the default marked), plus an analytic roofline for a named shape.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# What a launch without num_warps / num_stages gets on CUDA (triton's CUDAOptions defaults): a spec must name what its
# launcher really uses, so the report compiles exactly that.
LAUNCH_NUM_WARPS = 4
LAUNCH_NUM_STAGES = 3


@dataclass(frozen=True)
class Roofline:
    shape: str        # human-readable, e.g. "B=1 S=4096 H=32 D=128 causal fwd"
    flops: float      # floating-point operations of one call at that shape
    bytes: float      # minimum HBM traffic of one call at that shape


@dataclass(frozen=True)
class KernelSpec:
    kernel: str                  # report name, e.g. "attention_fwd"
    fn: object                   # the @triton.jit function
    signature: dict              # arg name -> Triton type ("*fp16", "*bf16", "*fp32", "i32", "fp32", "constexpr")
    constexprs: dict             # constexpr name -> value
    num_warps: int = LAUNCH_NUM_WARPS
    num_stages: int = LAUNCH_NUM_STAGES
    default: bool = False        # the config used under the interpreter / when not autotuning
    uses_dot: bool = False       # GEMM-bearing: must use tensor cores (mma / wgmma)
    roofline: Roofline | None = None
    archs: tuple | None = None   # the only archs (e.g. (90,)) this config is offered to, so compiled for; None: all
    extra: dict = field(default_factory=dict)

    @property
    def config(self) -> str:
        blocks = ",".join(f"{k}={v}" for k, v in sorted(self.constexprs.items()) if k.isupper())
        return f"{blocks},w={self.num_warps},s={self.num_stages}"

"""Our Triton FlashAttention forward as a TensorRT plugin, compiled ahead of time (TensorRT >= 10.9 `aot_impl`).

Plugin "gmaivl::flash_attention". In ONNX (see `plugin_attention`) it is a node of op type `flash_attention`,
domain `gmaivl`, with attributes `plugin_namespace="gmaivl"` and `aot=1` (TensorRT's parser then bakes the PTX into
the engine, so the engine runs without Python, e.g. under trtexec), plus the plugin's own attributes `causal` and
`softmax_scale`.

Plugin I/O (all linear, contiguous):
    inputs:  q (B, S, Hq, D), k (B, S, Hkv, D), v (B, S, Hkv, D) fp16 | bf16; cu_seqlens (B + 1,) int32 = [0, S, 2S..]
    outputs: out (B, S, Hq, D) like q; lse (Hq, B * S) fp32 (softmax log-sum-exp, scratch for the kernel)
It serves the vision encoder's attention (non-causal, every image the same length). The decoder keeps the
standard ONNX Attention op: its left padding and KV-cache offsets are masks this kernel does not take.

TensorRT passes an AOT kernel its arguments as (inputs..., extra scalar args..., outputs...). `_attn_fwd_trt`
has exactly that order and calls the team kernel `kernels.attention._attn_fwd_kernel`, so the maths is not copied.
`compile_attention_ptx` needs only Triton (no GPU, no TensorRT) and is what `aot_impl` returns.
"""
# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions' annotations as
# real objects (trtp.TensorDesc, Tuple[...]) to tell tensors from attributes.
import functools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import torch
import triton
import triton.language as tl

from gmaivl_rt.kernels._dispatch import interpreting, pick_config
from gmaivl_rt.kernels.attention import _LOG2E, FWD_CONFIGS, _attn_fwd_kernel, attention_reference, launch_attrs
from gmaivl_rt.processes import ends_with_parent

PLUGIN_NAMESPACE = "gmaivl"
PLUGIN_NAME = "flash_attention"
PLUGIN_ID = f"{PLUGIN_NAMESPACE}::{PLUGIN_NAME}"
PLUGIN_DTYPES = ("fp16", "bf16")
DEFAULT_ARCH = 80  # sm_80 PTX is forward compatible: the driver JITs it for newer GPUs


@triton.jit
def _attn_fwd_trt(Q, K, V, CU, NUM_HEADS, GROUP, TOTAL_Q, Out, LSE, QK_SCALE: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """TensorRT's argument order around `_attn_fwd_kernel`. Grid: (B * NUM_HEADS, cdiv(S, BLOCK_M)).
    QK_SCALE (softmax scale * log2 e) is a compile-time constant: TensorRT's extra arguments are integers."""
    _attn_fwd_kernel(Q, K, V, Out, LSE, CU, CU, QK_SCALE, NUM_HEADS, GROUP, TOTAL_Q, HEAD_DIM, BLOCK_D, BLOCK_M,
                     BLOCK_N, CAUSAL, UPCAST, PRECISION)


@dataclass(frozen=True)
class AotKernel:
    name: str          # the PTX entry point
    ptx: str
    block_m: int       # queries per program: grid y = cdiv(S, block_m)
    num_warps: int     # block x = num_warps * 32
    shared_bytes: int  # dynamic shared memory per program


def kernel_signature(dtype: str) -> dict:
    """Triton signature of `_attn_fwd_trt` for fp16 | bf16 tensors."""
    if dtype not in PLUGIN_DTYPES:
        raise ValueError(f"flash_attention plugin: dtype {dtype!r} is not one of {PLUGIN_DTYPES}")
    ptr = f"*{dtype}"
    return {"Q": ptr, "K": ptr, "V": ptr, "CU": "*i32", "NUM_HEADS": "i32", "GROUP": "i32", "TOTAL_Q": "i32",
            "Out": ptr, "LSE": "*fp32", **dict.fromkeys(("QK_SCALE", "HEAD_DIM", "BLOCK_D", "BLOCK_M", "BLOCK_N",
                                                          "CAUSAL", "UPCAST", "PRECISION"), "constexpr")}


@functools.lru_cache(maxsize=None)
def compile_attention_ptx(dtype: str, head_dim: int, causal: bool, softmax_scale: Optional[float] = None,
                          arch: int = DEFAULT_ARCH) -> AotKernel:
    """Compile `_attn_fwd_trt` to PTX for sm_<arch> with the default forward config of kernels/attention.py.
    Runs anywhere Triton is installed: no GPU and no TensorRT needed. Under TRITON_INTERPRET=1 `@triton.jit`
    yields interpreter objects that cannot be compiled, so the work moves to a child process without it."""
    if interpreting():
        return _compile_in_child(dtype, head_dim, causal, softmax_scale, arch)
    return _compile(dtype, head_dim, causal, softmax_scale, arch)


def _compile_in_child(dtype, head_dim, causal, softmax_scale, arch) -> AotKernel:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import dataclasses, json, sys; from gmaivl_rt.runtime.trt_plugin import _compile; "
            "json.dump(dataclasses.asdict(_compile(*json.loads(sys.argv[1]))), sys.stdout)")
    args = json.dumps([dtype, head_dim, causal, softmax_scale, arch])
    # the compile ends with this process (kill -9 included) instead of running on with nobody to read its answer
    child = subprocess.run([sys.executable, "-c", code, args], env=env, capture_output=True, text=True,
                           **ends_with_parent())
    if child.returncode:
        raise RuntimeError(f"flash_attention plugin: compiling the kernel failed:\n{child.stderr[-4000:]}")
    return AotKernel(**json.loads(child.stdout))


def _compile(dtype, head_dim, causal, softmax_scale, arch) -> AotKernel:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not 0 < head_dim <= 256:
        raise ValueError(f"flash_attention plugin: head_dim {head_dim} must be in 1..256")
    block_m, block_n, num_warps, num_stages = pick_config(FWD_CONFIGS)[:4]  # the default: offered to every arch
    scale = softmax_scale if softmax_scale is not None else head_dim ** -0.5
    constexprs = {"QK_SCALE": float(scale * _LOG2E), "HEAD_DIM": head_dim,
                  "BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "BLOCK_M": block_m, "BLOCK_N": block_n,
                  "CAUSAL": bool(causal), "UPCAST": False, "PRECISION": "tf32"}
    # TensorRT hands plugins 256-byte-aligned buffers: specialise every pointer as 16-divisible, as a Triton launch
    # would, so loads vectorise.
    signature = kernel_signature(dtype)
    source = ASTSource(fn=_attn_fwd_trt, signature=signature, constexprs=constexprs,
                       attrs=launch_attrs(_attn_fwd_trt, signature, {}))
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    scratch = getattr(compiled.metadata, "global_scratch_size", 0) or 0
    if scratch:
        raise RuntimeError(f"flash_attention plugin: the kernel wants {scratch} bytes of global scratch, which a "
                           "TensorRT AOT plugin cannot provide")
    visible = sum(1 for t in signature.values() if t != "constexpr")
    ptx = strip_hidden_params(compiled.asm["ptx"], compiled.metadata.name, visible)
    return AotKernel(name=compiled.metadata.name, ptx=ptx, block_m=block_m, num_warps=num_warps,
                     shared_bytes=int(compiled.metadata.shared))


def ptx_entry_params(ptx: str, name: str) -> list[str]:
    """The `.param` declarations of kernel `name`'s `.entry` in a PTX text, in order."""
    match = re.search(rf"\.entry\s+{re.escape(name)}\s*\((.*?)\)", ptx, flags=re.DOTALL)
    if match is None:
        raise ValueError(f"no .entry {name} in the PTX")
    return [p.strip() for p in match.group(1).split(",") if p.strip()]


def strip_hidden_params(ptx: str, name: str, visible: int) -> str:
    """Triton >= 3.3 appends hidden global/profile scratch pointers to every kernel; TensorRT launches an AOT
    kernel with exactly (inputs, extra args, outputs). With zero scratch the body never reads them, so drop them
    from the entry; refuse if the body does use one."""
    params = ptx_entry_params(ptx, name)
    hidden = params[visible:]
    if not hidden:
        return ptx
    for decl in hidden:
        symbol = decl.split()[-1]
        if len(re.findall(rf"\b{re.escape(symbol)}\b", ptx)) > 1:
            raise RuntimeError(f"flash_attention plugin: the kernel body reads hidden parameter {symbol}")
    start = ptx.index(params[visible - 1]) + len(params[visible - 1])
    end = ptx.index(")", ptx.index(hidden[-1]))
    return ptx[:start] + "\n" + ptx[end:]


# ------------------------------------------------------------------------------------------------ ONNX side
def plugin_attention(q, k, v, *, causal: bool = False, softmax_scale: Optional[float] = None):
    """q: (B, S, Hq, D), k/v: (B, S, Hkv, D). During torch.onnx.export: the plugin node; otherwise the plain
    PyTorch reference, so the module stays runnable (and comparable) in eager mode."""
    if not torch.onnx.is_in_onnx_export():
        return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale)
    B, S, H, D = q.shape
    cu_seqlens = torch.arange(B + 1, dtype=torch.int32) * S
    scale = softmax_scale if softmax_scale is not None else D ** -0.5
    out, _lse = torch.onnx.ops.symbolic_multi_out(
        PLUGIN_ID, (q, k, v, cu_seqlens),
        attrs={"plugin_namespace": PLUGIN_NAMESPACE, "aot": 1, "causal": int(causal), "softmax_scale": float(scale)},
        dtypes=(q.dtype, torch.float32), shapes=(q.shape, (H, B * S)), version=1)
    return out


# ------------------------------------------------------------------------------------------------ TensorRT side
def import_tensorrt(min_version=(10, 9), why="AOT Python plugins need"):
    """(tensorrt, tensorrt.plugin), or an ImportError saying what to install."""
    wanted = ".".join(map(str, min_version))
    try:
        import tensorrt as trt
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise ImportError(
            f"TensorRT is not installed. Install NVIDIA's TensorRT >= {wanted} Python package for your CUDA version "
            "(`pip install tensorrt-cu12` for CUDA 12.x, `tensorrt-cu13` for CUDA 13.x; the wheels come from "
            "NVIDIA's index, pypi.nvidia.com) on a machine with an NVIDIA GPU and driver, plus `cuda-python` "
            f"or torch with CUDA to run engines. ({e})") from None
    version = tuple(int(p) for p in trt.__version__.split(".")[:2])
    if version < tuple(min_version):
        raise ImportError(f"TensorRT {trt.__version__} is too old: {why} TensorRT >= {wanted}")
    return trt, trtp


_REGISTERED = False


def register_plugin():
    """Register "gmaivl::flash_attention" with TensorRT's plugin registry (once per process). Must run before an
    ONNX graph with the plugin node is parsed and before an engine holding it is deserialized."""
    global _REGISTERED
    if _REGISTERED:
        return
    trt, trtp = import_tensorrt()
    trt_dtypes = {trt.float16: "fp16", trt.bfloat16: "bf16"}

    @trtp.register(PLUGIN_ID)
    def _describe(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cu_seqlens: trtp.TensorDesc,
                  causal: int, softmax_scale: float) -> Tuple[trtp.TensorDesc, trtp.TensorDesc]:
        lse = trtp.from_shape_expr((q.shape_expr[2], q.shape_expr[0] * q.shape_expr[1]), dtype=trt.float32)
        return q.like(), lse

    @trtp.autotune(PLUGIN_ID)
    def _formats(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cu_seqlens: trtp.TensorDesc,
                 causal: int, softmax_scale: float,
                 outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc]) -> List[trtp.AutoTuneCombination]:
        # q, k, v and out share fp16 or bf16; cu_seqlens int32; lse fp32.
        return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, INT32, FP16|BF16, FP32", "LINEAR")]

    @trtp.aot_impl(PLUGIN_ID)
    def _aot(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cu_seqlens: trtp.TensorDesc,
             causal: int, softmax_scale: float, outputs: Tuple[trtp.TensorDesc, trtp.TensorDesc], tactic: int
             ) -> Tuple[Union[str, bytes], Union[str, bytes], trtp.KernelLaunchParams, trtp.SymExprs]:
        head_dim = q.shape_expr[3]
        if not head_dim.is_constant:
            raise ValueError("flash_attention plugin: head_dim must be static")
        kernel = compile_attention_ptx(trt_dtypes[q.dtype], int(head_dim.constant_value), bool(causal),
                                       float(softmax_scale))
        launch = trtp.KernelLaunchParams()
        launch.grid_x = q.shape_expr[0] * q.shape_expr[2]  # (sequence, head) pairs on x: y stops at 65535
        launch.grid_y = trtp.cdiv(q.shape_expr[1], kernel.block_m)
        launch.block_x = kernel.num_warps * 32
        launch.shared_mem = kernel.shared_bytes
        extra = trtp.SymIntExprs.from_tuple([
            trtp.SymInt32(q.shape_expr[2]),                      # NUM_HEADS
            trtp.SymInt32(q.shape_expr[2] // k.shape_expr[2]),   # GROUP
            trtp.SymInt32(q.shape_expr[0] * q.shape_expr[1]),    # TOTAL_Q
        ])
        return kernel.name.encode(), kernel.ptx.encode(), launch, extra

    @trtp.impl(PLUGIN_ID)
    def _jit(q: trtp.Tensor, k: trtp.Tensor, v: trtp.Tensor, cu_seqlens: trtp.Tensor, causal: int,
             softmax_scale: float, outputs: Tuple[trtp.Tensor, trtp.Tensor], stream: int) -> None:
        # Python fallback when a graph asks for aot=0: the same kernel through gmaivl_rt.kernels.attention.
        from gmaivl_rt.kernels.attention import attention

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            qt, kt, vt = (torch.as_tensor(t, device="cuda") for t in (q, k, v))
            out = torch.as_tensor(outputs[0], device="cuda")
            out.copy_(attention(qt, kt, vt, causal=bool(causal), softmax_scale=softmax_scale))

    _REGISTERED = True

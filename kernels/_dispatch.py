"""Which implementation an op runs: the Triton kernel or its plain PyTorch reference.

`GMAIVL_KERNELS=triton|torch|auto` (default `auto`), read at call time so tests can switch it:
- `auto`: CUDA tensors take Triton, CPU tensors the reference; on CUDA, the GEMM-bearing ops (attention, decode,
  projector GEMMs, fused loss, patch embedding) take the reference for fp32 inputs, and attention/decode for head
  dims outside `SUPPORTED_HEAD_DIMS` (see `reference_reason`).
- `triton`: always Triton. CPU tensors then need `TRITON_INTERPRET=1` (the interpreter runs kernels on CPU); a
  head dim over 128 is refused with a clear error.
- `torch`: always the reference.

fp32 policy: our GEMM tiles are sized for 16-bit operands. In fp32 they spill (attention at head dim 128 spills
7-22 KB per thread; dq exceeds sm_80 shared memory) and the ieee GEMM uses no tensor cores, so an fp32 model on CUDA
runs cuBLAS/SDPA instead (which use TF32 where torch allows it). Load or autocast to bf16 for the Triton path.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_MODES = ("auto", "triton", "torch")

# Floating-point contraction (FMA) explicitly on for every kernel we launch and every compile the report makes:
# triton 3.9 warns when TRITON_DEFAULT_FP_FUSION is unset and 3.10 flips the default. A caller's own setting wins.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def fp_fusion() -> bool:
    """Whether our kernels compile with FMA contraction (TRITON_DEFAULT_FP_FUSION, set to 1 by this package)."""
    return os.environ.get("TRITON_DEFAULT_FP_FUSION", "1").strip().lower() not in ("0", "false", "off", "")


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install on an unsupported platform
        return False
    return True


def kernel_mode() -> str:
    mode = os.environ.get("GMAIVL_KERNELS", "auto").strip().lower() or "auto"
    if mode not in _MODES:
        raise ValueError(f"GMAIVL_KERNELS={mode!r} is not one of {', '.join(_MODES)}")
    return mode


# Head dims the attention and decode kernels support: every config compiles spill-free at these (kernels report).
# 256 does not (every forward and dk/dv config spills on sm_80, dq needs 256 KB shared memory on sm_90).
MAX_HEAD_DIM = 128
SUPPORTED_HEAD_DIMS = "up to 128; multiples of 8 load fastest"


def unsupported_head_dim(head_dim: int) -> str | None:
    """Why the Triton attention kernels do not take `head_dim`, or None when they do."""
    if not 0 < head_dim <= MAX_HEAD_DIM:
        return f"head_dim {head_dim} is not supported by the Triton attention kernels ({SUPPORTED_HEAD_DIMS})"
    return None


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype an op computes in: autocast's when it is on for the tensor's device, else the tensor's."""
    if tensor.is_floating_point() and torch.is_autocast_enabled(tensor.device.type):
        return torch.get_autocast_dtype(tensor.device.type)
    return tensor.dtype


def reference_reason(device_type: str, dtype: torch.dtype, *, gemm: bool = False,
                     head_dim: int | None = None) -> str | None:
    """In `auto` mode on CUDA: why an op with these inputs takes the PyTorch reference instead of Triton (None: it
    takes Triton). gemm: the op multiplies matrices (tl.dot); head_dim: an attention op's head dim."""
    if device_type != "cuda":
        return "not a CUDA tensor"
    if gemm and dtype == torch.float32:
        return "fp32 on CUDA takes the reference (cuBLAS/SDPA; our tiles are sized for 16-bit operands)"
    if head_dim is not None:
        return unsupported_head_dim(head_dim)
    return None


def use_triton(*tensors: torch.Tensor, gemm: bool = False, head_dim: int | None = None) -> bool:
    """Decide, for the tensors an op was given, whether it runs its Triton kernel. gemm / head_dim: see
    `reference_reason` (the auto mode's routing); a forced `triton` mode refuses an unsupported head dim."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if mode == "auto":
        if not (on_cuda and triton_available()):
            return False
        return reference_reason("cuda", compute_dtype(tensors[0]), gemm=gemm, head_dim=head_dim) is None
    if head_dim is not None and unsupported_head_dim(head_dim):
        raise ValueError(unsupported_head_dim(head_dim) + "; use GMAIVL_KERNELS=auto or torch for the reference")
    if not triton_available():
        raise RuntimeError("GMAIVL_KERNELS=triton but triton cannot be imported on this machine")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "GMAIVL_KERNELS=triton was given CPU tensors; set TRITON_INTERPRET=1 (before triton is imported) "
            "to run the Triton kernels on the CPU through the interpreter"
        )
    return True


@contextlib.contextmanager
def kernels(mode: str):
    """Temporarily force a kernel mode: `with kernels("triton"): ...`."""
    if mode not in _MODES:
        raise ValueError(f"kernel mode {mode!r} is not one of {', '.join(_MODES)}")
    old = os.environ.get("GMAIVL_KERNELS")
    os.environ["GMAIVL_KERNELS"] = mode
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("GMAIVL_KERNELS", None)
        else:
            os.environ["GMAIVL_KERNELS"] = old


_FORCED_CONFIGS: dict = {}  # id(config list) -> index, while `forced_config` is active


def pick_config(configs: list, default_index: int = 0):
    """The fixed config a launcher uses when it does not autotune: the one `forced_config` names, else the default
    (under the interpreter, or with no GPU, autotuning cannot run)."""
    return configs[_FORCED_CONFIGS.get(id(configs), default_index)]


def config_forced(configs: list) -> bool:
    """True while `forced_config` pins this config list: the launcher then skips autotuning, on a GPU too."""
    return id(configs) in _FORCED_CONFIGS


@contextlib.contextmanager
def forced_config(configs: list, index: int):
    """Run every launch that draws from `configs` (a kernel module's autotune list) with `configs[index]`, autotuning
    or not: how the GPU check runs each candidate on its own against the reference."""
    if not 0 <= index < len(configs):
        raise ValueError(f"config index {index} is outside the {len(configs)} configs")
    old = _FORCED_CONFIGS.get(id(configs))
    _FORCED_CONFIGS[id(configs)] = index
    try:
        yield configs[index]
    finally:
        if old is None:
            _FORCED_CONFIGS.pop(id(configs), None)
        else:
            _FORCED_CONFIGS[id(configs)] = old

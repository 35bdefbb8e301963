"""Which implementation an op runs: the Triton kernel or its plain PyTorch reference.

`GMAIVL_KERNELS=triton|torch|auto` (default `auto`), read at call time so tests can switch it:
- `auto`: CUDA tensors take Triton, CPU tensors the reference.
- `triton`: always Triton. CPU tensors then need `TRITON_INTERPRET=1` (the interpreter runs kernels on CPU).
- `torch`: always the reference.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch

_MODES = ("auto", "triton", "torch")


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


def use_triton(*tensors: torch.Tensor) -> bool:
    """Decide, for the tensors an op was given, whether it runs its Triton kernel."""
    mode = kernel_mode()
    if mode == "torch":
        return False
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if mode == "auto":
        return on_cuda and triton_available()
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


def pick_config(configs: list, default_index: int = 0):
    """Under the interpreter (or with no GPU) autotuning cannot run: use one fixed config."""
    return configs[default_index]

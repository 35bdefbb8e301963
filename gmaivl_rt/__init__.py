"""gmaivl-rt: a Triton-kernel-optimized runtime and trainer for GMAI-VL-style medical vision-language models."""
from gmaivl_rt.config import GMAIVLConfig, TextConfig, VisionConfig
from gmaivl_rt.engine import Engine
from gmaivl_rt.model import GMAIVL, GMAIVLOutput, KVCache

__version__ = "0.1.0"
__all__ = ["Engine", "GMAIVL", "GMAIVLConfig", "GMAIVLOutput", "KVCache", "TextConfig", "VisionConfig", "load"]


def load(path, backend: str = "torch", **kwargs):
    """A model folder (or exported folder) ready for `.generate`: backend "torch", "onnx" or "tensorrt"."""
    from gmaivl_rt.runtime import load as _load
    return _load(path, backend=backend, **kwargs)

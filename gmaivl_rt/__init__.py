"""gmaivl-rt: a Triton-kernel-optimized runtime and trainer for GMAI-VL-style medical vision-language models."""
from gmaivl_rt.config import GMAIVLConfig, TextConfig, VisionConfig
from gmaivl_rt.engine import Engine
from gmaivl_rt.errors import GmaivlError, InputError, LimitError, ModelError
from gmaivl_rt.limits import Limits, check_generation
from gmaivl_rt.model import GMAIVL, GMAIVLOutput, KVCache

__version__ = "0.1.0"
__all__ = ["Engine", "GMAIVL", "GMAIVLConfig", "GMAIVLOutput", "GmaivlError", "InputError", "KVCache", "LimitError",
           "Limits", "ModelError", "PreparedRequest", "TextConfig", "VisionConfig", "check_generation", "load",
           "to_medical_image"]


def load(path, backend: str = "torch", **kwargs):
    """A model folder (or exported folder) ready for `.ask` / `.build_request` / `.generate`: backend "torch",
    "onnx" or "tensorrt"; `limits=Limits(...)` sets this runtime's request limits."""
    from gmaivl_rt.runtime import load as _load
    return _load(path, backend=backend, **kwargs)


def __getattr__(name):  # the image and request modules import pydicom / PIL lazily: only when asked for
    if name == "to_medical_image":
        from gmaivl_rt.image_input import to_medical_image
        return to_medical_image
    if name == "PreparedRequest":
        from gmaivl_rt.request import PreparedRequest
        return PreparedRequest
    raise AttributeError(f"module 'gmaivl_rt' has no attribute {name!r}")

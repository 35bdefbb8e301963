"""gmaivl-rt: a Triton-kernel-optimized runtime and trainer for GMAI-VL-style medical vision-language models.

The names below load on first use (PEP 562), so `import gmaivl_rt` is cheap and imports nothing else of ours:
`gmaivl_rt.bare_names` runs in the middle of another package's import and must not pull the model in."""
import importlib

__version__ = "0.1.0"

_PUBLIC = {  # name -> the module that defines it
    "GMAIVLConfig": "model.config", "TextConfig": "model.config", "VisionConfig": "model.config",
    "GMAIVL": "model.modeling", "GMAIVLOutput": "model.modeling", "KVCache": "model.modeling",
    "check_generation": "model.sampling",
    "Engine": "engine.engine",
    "GmaivlError": "errors", "InputError": "errors", "LimitError": "errors", "ModelError": "errors",
    "Limits": "limits",
    "to_medical_image": "medical.convert",
    "DicomWebRef": "medical.dicomweb",
    "PreparedRequest": "runtime.request",
}
__all__ = sorted([*_PUBLIC, "load"])


def load(path, backend: str = "torch", **kwargs):
    """A model folder (or exported folder) ready for `.ask` / `.build_request` / `.generate`: backend "torch",
    "onnx" or "tensorrt"; `limits=Limits(...)` sets this runtime's request limits."""
    from gmaivl_rt.runtime.backends import load as _load
    return _load(path, backend=backend, **kwargs)


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f"gmaivl_rt.{_PUBLIC[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'gmaivl_rt' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_PUBLIC])

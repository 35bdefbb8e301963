"""ONNX exports of tiny checkpoints, made once per test session and shared by the export, op inventory and
TensorRT tests (an export takes several seconds; every test module would otherwise repeat it)."""
from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

from hf_reference import make_hf_llava

from gmaivl_rt import GMAIVL

_ROOT = Path(tempfile.mkdtemp(prefix="gmaivl-export-tests-"))
atexit.register(shutil.rmtree, _ROOT, ignore_errors=True)


@functools.lru_cache(maxsize=None)
def hf_checkpoint() -> Path:
    """A Llava checkpoint transformers made and saved (tiny CLIP + Llama with grouped-query attention)."""
    path = _ROOT / "hf_llava"
    make_hf_llava(path)
    return path


@functools.lru_cache(maxsize=None)
def dynamic_checkpoint() -> Path:
    """The same weights with native dynamic resolution switched on (GMAIVL's own config extension)."""
    model = GMAIVL.from_pretrained(hf_checkpoint())
    model.config = model.config.replace(vision={"dynamic_resolution": True})
    path = _ROOT / "hf_llava_dynamic"
    model.save_pretrained(path)
    return path


@functools.lru_cache(maxsize=None)
def exported(variant: str) -> Path:
    """variant: "fp32", "fp16" (all three graphs), "dynamic" (fp32, dynamic-resolution checkpoint),
    "plugin" (fp16 vision encoder with the TensorRT attention plugin node)."""
    from gmaivl_rt.export.onnx_export import export_onnx

    out = _ROOT / f"onnx_{variant}"
    if variant in ("fp32", "fp16"):
        export_onnx(hf_checkpoint(), out, dtype=variant)
    elif variant == "dynamic":
        export_onnx(dynamic_checkpoint(), out)
    elif variant == "plugin":
        export_onnx(hf_checkpoint(), out, dtype="fp16", attention="trt_plugin", graphs=("vision_encoder",))
    else:
        raise ValueError(variant)
    return out

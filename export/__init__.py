"""Deployment: ONNX graphs (`onnx_export`, `graphs`), the ONNX Runtime backend (`ort_backend`), TensorRT engines
(`tensorrt_build`, `profiles`, `trt_plugin`, `trt_backend`) and the TensorRT op inventory check (`op_inventory`).
Modules are imported on use: TensorRT, Triton and onnxruntime load only where they are needed."""

import importlib.util


def require(*packages: str, extra: str = "onnx") -> None:
    """Fail early, naming what to install, when an optional package an export path needs is missing."""
    missing = [p for p in packages if importlib.util.find_spec(p) is None]
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: pip install 'gmaivl-rt[{extra}]'")

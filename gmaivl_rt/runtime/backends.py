"""`gmaivl_rt.load(path, backend=...)`: one generate() over three backends.

- "torch":    `torch_backend.TorchBackend`, a thin wrapper over `GMAIVL.from_pretrained(path)` (a model folder).
- "onnx":     `ort_backend.OnnxBackend` over a folder written by `gmaivl-rt export onnx`.
- "tensorrt": `trt_backend.TensorRTBackend` over a folder written by `gmaivl-rt export tensorrt`.

Every backend's `generate` follows `GMAIVL.generate`: left-padded prompts, image features written over the image
tokens, a KV cache kept between steps, next tokens chosen by `gmaivl_rt.model.sampling.select_next_token`, finished
rows filled with pad_token_id. Graph backends share the loop in `graph_backend.GraphBackend`; they only run graphs.
"""
from __future__ import annotations

from pathlib import Path

from gmaivl_rt.limits import DEFAULT_LIMITS, PREPARED_IMAGE_CACHE_BYTES, Limits
from gmaivl_rt.runtime.base import TOKENIZER_FILES
from gmaivl_rt.runtime.generation_config import resolve_generation_config
from gmaivl_rt.runtime.prepared_images import PreparedImageCache
from gmaivl_rt.runtime.torch_backend import TorchBackend

BACKENDS = ("torch", "onnx", "tensorrt")


def load(path, backend: str = "torch", *, limits: Limits | None = None, generation_config="auto",
         prepared_image_cache_bytes: int = PREPARED_IMAGE_CACHE_BYTES, **kwargs):
    """path: a model folder (torch) or an exported folder (onnx / tensorrt). limits: the request `Limits` of this
    runtime (default `Limits()`). prepared_image_cache_bytes: the most bytes of preprocessed pixels kept for
    follow-up questions about the same image (`gmaivl_rt.runtime.prepared_images`; 0 keeps nothing).
    generation_config: where the decoding defaults come from ("auto": the folder's generation_config.json, else
    plain greedy; "none": plain greedy; or a file / folder path;
    `gmaivl_rt.runtime.generation_config`), resolved here, before the weights load. kwargs go to the backend: torch: dtype, device; onnx: device or providers, threads, inter_op_threads,
    allow_spinning (`ort_backend.session_options`);
    tensorrt: device. torch on CUDA without a dtype loads an fp32 checkpoint in bf16 (fp16 on GPUs before sm_80;
    `checkpoint.inference_dtype`); an explicit dtype wins, CPU keeps the stored dtype. A folder with tokenizer
    files has its tokenizer loaded and checked here (ModelError when it cannot serve); a folder without any serves
    `generate()` on token ids only."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"load: {str(path)!r} is not a folder")
    if limits is not None and not isinstance(limits, Limits):
        raise TypeError(f"load: limits must be a gmaivl_rt.Limits, got {type(limits).__name__}")
    generation = resolve_generation_config(generation_config, path)
    prepared_images = PreparedImageCache(prepared_image_cache_bytes)  # before the weights: a bad size fails fast
    if backend == "torch":
        runtime = TorchBackend(path, **kwargs)
    elif backend == "onnx":
        from gmaivl_rt.extras import require
        from gmaivl_rt.runtime.ort_backend import OnnxBackend

        require("onnxruntime")

        runtime = OnnxBackend(path, **kwargs)
    elif backend == "tensorrt":
        from gmaivl_rt.runtime.trt_backend import TensorRTBackend

        runtime = TensorRTBackend(path, **kwargs)
    else:
        raise ValueError(f"load: backend {backend!r} is not one of {', '.join(BACKENDS)}")
    runtime.limits = limits or DEFAULT_LIMITS
    runtime.generation = generation
    runtime.prepared_images = prepared_images
    if any((path / name).exists() for name in TOKENIZER_FILES):
        runtime.tokenizer  # noqa: B018  (fail at load, not at the first request)
    return runtime

"""The names of an exported folder, shared by what writes it (`gmaivl_rt.export`: `export onnx`, `export tensorrt`)
and what reads it (the onnx and tensorrt backends here): the deploy file, the graph and engine files, and the
decoder's KV-cache input/output names. Defined below both, so the runners need nothing from the exporters."""
from __future__ import annotations

DEPLOY_JSON = "gmaivl_deploy.json"
GRAPH_FILES = {"vision_encoder": "vision_encoder.onnx", "embed_tokens": "embed_tokens.onnx",
               "decoder_model_merged": "decoder_model_merged.onnx"}
FORMAT_VERSION = 2  # 2: the decoder takes logits_indices and returns logits at those positions only
ENGINE_JSON = "gmaivl_trt.json"
ENGINE_FILES = {name: file.replace(".onnx", ".engine") for name, file in GRAPH_FILES.items()}


def past_names(num_layers: int) -> list[str]:
    """The decoder's KV-cache inputs: past_key_values.{layer}.key / .value, layer by layer."""
    return [f"past_key_values.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]


def present_names(num_layers: int) -> list[str]:
    """The decoder's KV-cache outputs: present.{layer}.key / .value, layer by layer."""
    return [f"present.{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]

"""Exported ONNX graphs run by hand, without gmaivl_rt's backends: the independent check of an export (the export
folders themselves are the `exported` fixture of tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path


def graph_next_token_logits(onnx_dir, input_ids, pixel_values, image_token_index: int, run, float_dtype=None):
    """The exported graphs run by hand, without gmaivl_rt's backends: vision_encoder -> embed_tokens -> image
    features into the image-token rows -> decoder_model_merged with an empty cache. input_ids (1, S) int64,
    pixel_values (1, 3, H, W) float (torch); run(graph_path, feeds) -> list of numpy outputs (ONNX Runtime, or
    ONNX's reference evaluator for bf16); float_dtype: the graphs' float input dtype (numpy; default float32).
    Returns the last position's logits (vocab,) as a float32 torch tensor."""
    import json

    import numpy as np
    import torch

    onnx_dir = Path(onnx_dir)
    float_dtype = float_dtype or np.float32
    ids = input_ids.numpy().astype(np.int64)
    features = run(onnx_dir / "vision_encoder.onnx", {"pixel_values": pixel_values.numpy().astype(float_dtype)})[0]
    embeds = run(onnx_dir / "embed_tokens.onnx", {"input_ids": ids})[0]
    assert features.dtype == embeds.dtype == float_dtype
    embeds[ids == image_token_index] = features.reshape(-1, features.shape[-1])
    deploy = json.loads((onnx_dir / "gmaivl_deploy.json").read_text())
    decoder = deploy["decoder"]
    empty = np.zeros((1, decoder["num_kv_heads"], 0, decoder["head_dim"]), float_dtype)
    feeds = {"inputs_embeds": embeds, "attention_mask": np.ones(ids.shape, np.int64),
             "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    if any(i["name"] == "logits_indices" for i in deploy["graphs"]["decoder_model_merged"]["inputs"]):
        feeds["logits_indices"] = np.array([[ids.shape[1] - 1]], np.int64)  # the last position's logits only
    for layer in range(decoder["num_layers"]):
        feeds[decoder["past_key"].format(layer=layer)] = empty
        feeds[decoder["past_value"].format(layer=layer)] = empty
    logits = run(onnx_dir / "decoder_model_merged.onnx", feeds)[0]
    assert logits.dtype == np.float32, logits.dtype  # fp32 logits in every graph dtype
    return torch.from_numpy(np.ascontiguousarray(logits[0, -1]))


def ort_run(graph_path, feeds):
    """One ONNX Runtime (CPU) run of a graph file."""
    import onnxruntime as ort

    return ort.InferenceSession(str(graph_path), providers=["CPUExecutionProvider"]).run(None, feeds)

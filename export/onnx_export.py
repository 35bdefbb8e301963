"""`gmaivl-rt export onnx`: the three ONNX graphs (vision encoder, token embedding, merged decoder) plus a JSON.

Layout written to OUT_DIR (the split ONNX Runtime GenAI / transformers.js users know):
    vision_encoder.onnx, embed_tokens.onnx, decoder_model_merged.onnx  (+ .onnx.data when a graph is over 2 GB)
    gmaivl_deploy.json   graphs and their I/O, special tokens, image token and count, chat template, model config
    generation_config.json  the model folder's decoding defaults, carried over (plain greedy written out when the
                         folder has none), so every backend's `ask` decodes as the torch backend does on the folder
    tokenizer files      copied when the model folder has them
Every file is written to a temporary folder first and moved into place with os.replace.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import torch

from gmaivl_rt.atomic import atomic_write_json, staged_files
from gmaivl_rt.model.chat import CHAT_TEMPLATE, IMAGE_TOKEN
from gmaivl_rt.model.checkpoint import DTYPE_NAMES
from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD
from gmaivl_rt.runtime.deploy_format import DEPLOY_JSON, FORMAT_VERSION, GRAPH_FILES, past_names, present_names
from gmaivl_rt.runtime.generation_config import GENERATION_CONFIG, resolve_generation_config, write_generation_config

from .graphs import build_graphs

log = logging.getLogger(__name__)

DTYPES = DTYPE_NAMES  # export --dtype names
DEFAULT_OPSET = 23  # first opset with the standard Attention op
EXTERNAL_DATA_BYTES = 2 * 1024**3 - 64 * 1024**2  # protobuf's 2 GB limit, minus room for the graph itself
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "chat_template.jinja", "chat_template.json", "added_tokens.json", "vocab.json", "merges.txt")


def graph_io_names(num_layers: int) -> dict:
    """Input and output names of each graph, in the order the exporter and the runtimes use."""
    return {
        "vision_encoder": (["pixel_values"], ["image_features"]),
        "embed_tokens": (["input_ids"], ["inputs_embeds"]),
        "decoder_model_merged": (["inputs_embeds", "attention_mask", "position_ids", "logits_indices"]
                                 + past_names(num_layers),
                                 ["logits"] + present_names(num_layers)),
    }


def _sample_inputs(name, config, dtype):
    """Inputs to trace with. Every dynamic size is >= 2 and differs from the others so torch.export neither
    specialises it nor ties unrelated dims together."""
    vision, text = config.vision, config.text
    if name == "vision_encoder":
        side = vision.image_size
        if getattr(vision, "dynamic_resolution", False):
            p = vision.patch_size
            return (torch.randn(2, 3, 3 * p, 5 * p, dtype=dtype),)
        return (torch.randn(2, 3, side, side, dtype=dtype),)
    if name == "embed_tokens":
        return (torch.randint(0, text.vocab_size, (2, 3)),)
    batch, seq, past, kept = 2, 3, 4, 5  # kept: logits_indices' width (indices may repeat)
    cache = [torch.randn(batch, text.num_kv_heads, past, text.head_dim, dtype=dtype)
             for _ in range(2 * text.num_layers)]
    return (torch.randn(batch, seq, text.hidden_size, dtype=dtype), torch.ones(batch, past + seq, dtype=torch.long),
            torch.arange(past, past + seq).expand(batch, seq).clone(), torch.arange(kept).remainder(seq).expand(
                batch, kept).clone(), cache)


def _dynamic_shapes(name, config):
    auto = torch.export.Dim.AUTO
    if name == "vision_encoder":
        return ({0: auto, 2: auto, 3: auto} if getattr(config.vision, "dynamic_resolution", False) else {0: auto},)
    if name == "embed_tokens":
        return ({0: auto, 1: auto},)
    cache = [{0: auto, 2: auto}] * (2 * config.text.num_layers)
    return ({0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}, cache)


def _dim_names(name, num_layers, dynamic_resolution):
    """Readable names for the symbolic dims of each graph input/output (axis -> name)."""
    if name == "vision_encoder":
        px = {0: "num_images", 2: "height", 3: "width"} if dynamic_resolution else {0: "num_images"}
        return {"pixel_values": px, "image_features": {0: "num_images", 1: "num_image_tokens"}}
    if name == "embed_tokens":
        return {"input_ids": {0: "batch_size", 1: "sequence_length"},
                "inputs_embeds": {0: "batch_size", 1: "sequence_length"}}
    names = {"inputs_embeds": {0: "batch_size", 1: "sequence_length"},
             "attention_mask": {0: "batch_size", 1: "total_sequence_length"},
             "position_ids": {0: "batch_size", 1: "sequence_length"},
             "logits_indices": {0: "batch_size", 1: "num_logits"},
             "logits": {0: "batch_size", 1: "num_logits"}}
    for n in past_names(num_layers):
        names[n] = {0: "batch_size", 2: "past_sequence_length"}
    for n in present_names(num_layers):
        names[n] = {0: "batch_size", 2: "total_sequence_length"}
    return names


def _rename_dims(model, dim_names):
    """Give the graph inputs/outputs readable dim names instead of torch.export's s0, s1, ...; the internal
    value_info keeps its symbols (only the interface matters to users and to TensorRT profiles)."""
    for value in list(model.graph.input) + list(model.graph.output):
        for axis, label in dim_names.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param or not dim.HasField("dim_value"):
                dim.Clear()
                dim.dim_param = label


def _tensor_io(values) -> list[dict]:
    import onnx

    out = []
    for v in values:
        t = v.type.tensor_type
        out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                    "shape": [d.dim_param or d.dim_value for d in t.shape.dim]})
    return out


def _torchvision_notice(record: logging.LogRecord) -> bool:
    """False for the exporter's "torchvision is not installed. Skipping torchvision::..." lines: it lists the
    torchvision ops it cannot register, none of which our graphs use."""
    return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _filtered(logger: logging.Logger, keep):
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def export_graph(module, name, config, path: Path, *, opset=DEFAULT_OPSET):
    """Trace one export module with torch.onnx.export(dynamo=True) and save it, with external data when the
    weights exceed protobuf's 2 GB limit. Returns the saved onnx.ModelProto (without external tensors loaded)."""
    import onnx

    dtype = next(module.parameters()).dtype
    inputs = _sample_inputs(name, config, dtype)
    in_names, out_names = graph_io_names(config.text.num_layers)[name]
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    with warnings.catch_warnings(), torch.no_grad(), _filtered(registry_log, _torchvision_notice):
        warnings.simplefilter("ignore")  # torch.export's FutureWarnings and dim-renaming chatter
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=opset, input_names=in_names,
                                    output_names=out_names, dynamic_shapes=_dynamic_shapes(name, config),
                                    verbose=False, optimize=True)
    model = program.model_proto
    _rename_dims(model, _dim_names(name, config.text.num_layers, getattr(config.vision, "dynamic_resolution", False)))
    weight_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    if weight_bytes > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    onnx.checker.check_model(str(path), full_check=False)  # path form: works for external data too
    return onnx.load(str(path), load_external_data=False)


def _special_tokens(config, model_dir: Path | None) -> dict:
    hf = config.to_hf_config() if hasattr(config, "to_hf_config") else {}
    text_hf = hf.get("text_config", {}) if isinstance(hf, dict) else {}
    tokens = {"image_token": IMAGE_TOKEN, "image_token_index": int(config.image_token_index)}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = text_hf.get(key, hf.get(key) if isinstance(hf, dict) else None)
        tokens[key] = value
    tokenizer_config = model_dir / "tokenizer_config.json" if model_dir else None
    if tokenizer_config is not None and tokenizer_config.is_file():
        tc = json.loads(tokenizer_config.read_text())
        for key in ("bos_token", "eos_token", "pad_token"):
            tok = tc.get(key)
            tokens[key] = tok.get("content") if isinstance(tok, dict) else tok
    return tokens


def _chat_template(model_dir: Path | None) -> str | None:
    if model_dir is not None:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        tc = model_dir / "tokenizer_config.json"
        if tc.is_file() and json.loads(tc.read_text()).get("chat_template"):
            return json.loads(tc.read_text())["chat_template"]
    return None


def _write_decoding_defaults(model_dir: Path | None, config, tmp: Path) -> None:
    """The export decodes as its model folder does: the folder's generation_config.json copied whole (its token ids
    and other tools' fields kept; checked first, ModelError if it is unusable), else the defaults the runtime
    resolves for it (plain greedy) written out with the model's token ids."""
    if model_dir is not None and (model_dir / GENERATION_CONFIG).is_file():
        resolve_generation_config("auto", model_dir)
        shutil.copyfile(model_dir / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        return
    text = config.text
    write_generation_config(tmp, resolve_generation_config("auto", model_dir).options,
                            token_ids={"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                                       "pad_token_id": text.pad_token_id})


def load_model(model_or_dir):
    """A GMAIVL instance, or a checkpoint folder GMAIVL.from_pretrained understands (fp32, CPU)."""
    if isinstance(model_or_dir, (str, os.PathLike)):
        from gmaivl_rt.model.modeling import GMAIVL

        path = Path(model_or_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"export: model folder {str(path)!r} does not exist")
        return GMAIVL.from_pretrained(path, dtype=torch.float32, device="cpu"), path
    return model_or_dir, None


def export_onnx(model_or_dir, out_dir, *, dtype="fp32", opset=DEFAULT_OPSET, attention="sdpa",
                graphs=tuple(GRAPH_FILES)) -> Path:
    """Export a GMAIVL model (instance or checkpoint folder) to `out_dir`. dtype: "fp32" | "fp16" | "bf16";
    attention: "sdpa" (standard ONNX Attention, runs in ONNX Runtime) | "trt_plugin" (our TensorRT plugin node,
    for `gmaivl-rt export tensorrt` only). Returns the path of the deployment JSON."""
    if dtype not in DTYPES:
        raise ValueError(f"export: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if opset < 23:
        raise ValueError(f"export: opset {opset} has no standard Attention op; use 23 or later")
    unknown = set(graphs) - set(GRAPH_FILES)
    if unknown:
        raise ValueError(f"export: unknown graphs {sorted(unknown)}; choose from {list(GRAPH_FILES)}")
    model, model_dir = load_model(model_or_dir)
    config = model.config
    out_dir = Path(out_dir)
    modules = build_graphs(config, model.state_dict(), dtype=DTYPES[dtype], attention=attention)
    described = {}
    with staged_files(out_dir, prefix=".export-") as tmp:
        for name in graphs:
            log.info("exporting %s (%s)", name, dtype)
            proto = export_graph(modules[name], name, config, tmp / GRAPH_FILES[name], opset=opset)
            described[name] = {"filename": GRAPH_FILES[name], "inputs": _tensor_io(proto.graph.input),
                               "outputs": _tensor_io(proto.graph.output)}
        if model_dir is not None:
            for fname in TOKENIZER_FILES:
                if (model_dir / fname).is_file():
                    shutil.copyfile(model_dir / fname, tmp / fname)
        _write_decoding_defaults(model_dir, config, tmp)
    vision, text = config.vision, config.text
    hf_config = config.to_hf_config() if hasattr(config, "to_hf_config") else None
    template = _chat_template(model_dir) or CHAT_TEMPLATE  # the internlm2 chatml of gmaivl_rt.model.chat
    deploy = {
        "format": "gmaivl-rt-onnx", "format_version": FORMAT_VERSION,
        "dtype": dtype, "opset": opset, "attention": attention,
        "graphs": described,
        "decoder": {"num_layers": text.num_layers, "num_kv_heads": text.num_kv_heads, "head_dim": text.head_dim,
                    "hidden_size": text.hidden_size, "vocab_size": text.vocab_size,
                    "past_key": "past_key_values.{layer}.key", "past_value": "past_key_values.{layer}.value",
                    "present_key": "present.{layer}.key", "present_value": "present.{layer}.value",
                    "kv_layout": "batch, kv_heads, sequence, head_dim", "padding_side": "left",
                    "logits_indices": "(batch, num_logits) int64 positions in 0..sequence_length-1 whose logits "
                                      "are returned, per row; generation passes each row's last real token"},
        "image": {"image_token_index": int(config.image_token_index), "tokens_per_image": vision.tokens_per_image(),
                  "image_size": vision.image_size, "patch_size": vision.patch_size,
                  "dynamic_resolution": bool(getattr(vision, "dynamic_resolution", False)),
                  "min_pixels": getattr(vision, "min_pixels", None), "max_pixels": getattr(vision, "max_pixels", None),
                  "mean": list(CLIP_MEAN), "std": list(CLIP_STD)},
        "special_tokens": _special_tokens(config, model_dir),
        "chat_template": template,
        "config": hf_config,
    }
    path = out_dir / DEPLOY_JSON
    atomic_write_json(path, deploy)
    return path

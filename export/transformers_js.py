"""`gmaivl-rt export onnx MODEL_DIR --out DIR --layout transformers.js`: a folder transformers.js loads as it is
(`AutoProcessor` + `LlavaForConditionalGeneration.from_pretrained(DIR)`, `local_files_only`), in Node or the browser.

    config.json                the model's LlavaConfig + a `transformers.js_config` block (default dtype, files)
    generation_config.json     the model folder's decoding defaults (as `export onnx` carries them)
    preprocessor_config.json   CLIPImageProcessor: resize to the model's square, bicubic, CLIP mean/std
    processor_config.json      LlavaProcessor: `<image>`, patch size, image tokens beyond the patches (0: CLS dropped)
    tokenizer.json, tokenizer_config.json (with the chat template), special_tokens_map.json when present
    onnx/embed_tokens.onnx, onnx/vision_encoder.onnx, onnx/decoder_model_merged.onnx, and per `--quantize` variant
    the same three with transformers.js' suffix (_quantized, _q4, _q4f16)
    quantization_report.json   sizes and agreement of each variant with the fp32 torch model (when quantized)
    onnx/F.onnx_data, F.onnx_data_1, ...  a graph's weights when they pass protobuf's 2 GB limit (listed per file in
                               config.json's use_external_data_format, as transformers.js reads them)

The graphs are `export onnx`'s (one export path); the decoder's `logits_indices` input becomes transformers.js'
`num_logits_to_keep` (a scalar: 0 = every position, k = the last k; generation passes 1) by a few ONNX nodes in
front of the same graph, so the weights and the computation are the ones the onnx backend runs.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path

from gmaivl_rt.atomic import atomic_write_json, staged_files
from gmaivl_rt.errors import ModelError
from gmaivl_rt.model.chat import CHAT_TEMPLATE, IMAGE_TOKEN
from gmaivl_rt.model.config import GMAIVLConfig
from gmaivl_rt.model.preprocess import CLIP_MEAN, CLIP_STD
from gmaivl_rt.runtime.deploy_format import GRAPH_FILES
from gmaivl_rt.runtime.generation_config import GENERATION_CONFIG

from . import quantize as q

log = logging.getLogger(__name__)

LAYOUTS = ("gmaivl", "transformers.js")
REPORT_JSON = "quantization_report.json"
# transformers.js' model types for an image-text-to-text LLaVA and the text configs its normaliser reads.
TRANSFORMERS_JS_MODEL_TYPES = {"llava"}
TRANSFORMERS_JS_TEXT_TYPES = {"llama", "mistral", "qwen2", "gemma", "phi3"}
BICUBIC = 3  # PIL's resample code, which transformers.js' image processors read


def transformers_js_problems(model_dir: Path) -> list[str]:
    """Why transformers.js could not run an export of `model_dir` (empty when it can). Read from the model folder's
    own files, before anything is exported."""
    problems = []
    raw = json.loads((model_dir / "config.json").read_text())
    config = GMAIVLConfig.from_hf_config(raw)
    if raw.get("model_type") not in TRANSFORMERS_JS_MODEL_TYPES:
        problems.append(f"config.json model_type {raw.get('model_type')!r} has no transformers.js image-text-to-text "
                        f"class (it maps {sorted(TRANSFORMERS_JS_MODEL_TYPES)})")
    text_type = (raw.get("text_config") or {}).get("model_type")
    if text_type not in TRANSFORMERS_JS_TEXT_TYPES:
        problems.append(f"text_config.model_type {text_type!r} has no transformers.js config mapping (it reads "
                        f"{sorted(TRANSFORMERS_JS_TEXT_TYPES)}; an InternLM2 checkpoint must be converted to the "
                        "Llama layout first, as `gmaivl-rt` saves it)")
    if config.vision.dynamic_resolution:
        problems.append("dynamic resolution: transformers.js' LLaVA processor resizes every image to one square, "
                        "so the image token count would not match the graph's")
    if not (model_dir / "tokenizer.json").is_file():
        problems.append("the model folder has no tokenizer.json (transformers.js' tokenizer reads only that file)")
    return problems


def _processor_files(config: GMAIVLConfig) -> tuple[dict, dict]:
    """preprocessor_config.json and processor_config.json for our preprocessing of a square image: resize to
    image_size x image_size (bicubic), rescale 1/255, CLIP mean/std. (Our reader pads a non-square picture to a
    square with the mean colour first, LLaVA's expand2square; transformers.js' CLIP processor has no such step, so
    pad before handing it a non-square picture, as the page does.)"""
    vision = config.vision
    side = vision.image_size
    patches = (side // vision.patch_size) ** 2
    preprocessor = {
        "image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
        "do_resize": True, "size": {"height": side, "width": side}, "resample": BICUBIC,
        "do_center_crop": False, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "do_convert_rgb": True,
    }
    processor = {"processor_class": "LlavaProcessor", "image_token": IMAGE_TOKEN, "patch_size": vision.patch_size,
                 "num_additional_image_tokens": vision.tokens_per_image() - patches,
                 "vision_feature_select_strategy": vision.select_strategy}
    return preprocessor, processor


def _tokenizer_config(model_dir: Path) -> dict:
    """The model's tokenizer_config.json with the chat template transformers.js' apply_chat_template reads and a
    class name it knows (transformers 5 writes 'TokenizersBackend')."""
    file = model_dir / "tokenizer_config.json"
    config = json.loads(file.read_text()) if file.is_file() else {}
    template = model_dir / "chat_template.jinja"
    config.setdefault("chat_template", template.read_text() if template.is_file() else CHAT_TEMPLATE)
    if config.get("tokenizer_class") in (None, "TokenizersBackend"):
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return config


def keep_last_logits(model) -> None:
    """Replace the decoder's `logits_indices` (batch, num_logits) input with transformers.js' scalar
    `num_logits_to_keep` (0: every position; k: the last k), computed by ONNX nodes in front of the graph. In place."""
    from onnx import TensorProto, helper

    graph = model.graph
    inputs = [i for i in graph.input if i.name == "logits_indices"]
    if not inputs:
        raise ModelError("decoder graph has no logits_indices input (export it again with `gmaivl-rt export onnx`)")
    graph.input.remove(inputs[0])
    graph.input.append(helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []))
    const = {"zero": 0, "one": 1, "axis0": [0], "idx0": 0, "idx1": 1}
    nodes = [helper.make_node("Constant", [], [f"nlk_{k}"], value=helper.make_tensor(
        f"nlk_{k}_value", TensorProto.INT64, [len(v)] if isinstance(v, list) else [], v if isinstance(v, list) else [v]))
        for k, v in const.items()]
    nodes += [
        helper.make_node("Shape", ["inputs_embeds"], ["nlk_shape"]),
        helper.make_node("Gather", ["nlk_shape", "nlk_idx0"], ["nlk_batch"], axis=0),
        helper.make_node("Gather", ["nlk_shape", "nlk_idx1"], ["nlk_seq"], axis=0),
        helper.make_node("Equal", ["num_logits_to_keep", "nlk_zero"], ["nlk_all"]),
        helper.make_node("Where", ["nlk_all", "nlk_seq", "num_logits_to_keep"], ["nlk_asked"]),
        helper.make_node("Min", ["nlk_asked", "nlk_seq"], ["nlk_keep"]),
        helper.make_node("Sub", ["nlk_seq", "nlk_keep"], ["nlk_start"]),
        helper.make_node("Range", ["nlk_start", "nlk_seq", "nlk_one"], ["nlk_range"]),
        helper.make_node("Unsqueeze", ["nlk_range", "nlk_axis0"], ["nlk_row"]),
        helper.make_node("Unsqueeze", ["nlk_batch", "nlk_axis0"], ["nlk_batch_1d"]),
        helper.make_node("Unsqueeze", ["nlk_keep", "nlk_axis0"], ["nlk_keep_1d"]),
        helper.make_node("Concat", ["nlk_batch_1d", "nlk_keep_1d"], ["nlk_out_shape"], axis=0),
        helper.make_node("Expand", ["nlk_row", "nlk_out_shape"], ["logits_indices"]),
    ]
    for node in reversed(nodes):
        graph.node.insert(0, node)


def _generation_config(file: Path, model_dir: Path) -> dict:
    """The export's decoding defaults plus where a chat reply ends, which transformers.js reads only there: the
    runtime's stop ids (the tokenizer's eos and `<|im_end|>`) unless the file names its own, and a pad id."""
    from gmaivl_rt.runtime.tokenizer import chat_stop_ids, load_tokenizer

    config = json.loads(file.read_text())
    tokenizer = load_tokenizer(model_dir)
    if config.get("eos_token_id") is None:
        config["eos_token_id"] = chat_stop_ids(tokenizer)
    if config.get("pad_token_id") is None and tokenizer.pad_token_id is not None:
        config["pad_token_id"] = tokenizer.pad_token_id
    return config


def external_data_chunk_names(file: str, chunks: int) -> list[str]:
    """transformers.js' names for a graph's external data files: `F_data`, `F_data_1`, ... (its
    getExternalDataChunkNames)."""
    return [f"{file}_data" + (f"_{i}" if i else "") for i in range(chunks)]


def _save_in_chunks(model, dst: Path, chunk_bytes: int) -> int:
    """Save `model` with every tensor of 1 KiB or more in external data files named as transformers.js fetches
    them (`dst.name` + `_data`, `_data_1`, ...), each at most `chunk_bytes` (a tensor larger than that gets a file of
    its own): a browser fetches each file into one ArrayBuffer. Returns the number of files."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors, set_external_data  # onnx has no public walker

    names, sizes = [], []
    handles = []
    try:
        for tensor in _get_all_tensors(model):
            if not tensor.HasField("raw_data") or len(tensor.raw_data) < 1024:
                continue
            data = tensor.raw_data
            if not sizes or (sizes[-1] and sizes[-1] + len(data) > chunk_bytes):
                names.append(external_data_chunk_names(dst.name, len(names) + 1)[-1])
                handles.append((dst.parent / names[-1]).open("wb"))
                sizes.append(0)
            handles[-1].write(data)
            set_external_data(tensor, names[-1], offset=sizes[-1], length=len(data))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            tensor.ClearField("raw_data")
            sizes[-1] += len(data)
    finally:
        for handle in handles:
            handle.close()
    onnx.save_model(model, str(dst))
    onnx.checker.check_model(str(dst), full_check=False)  # path form: reads the external files' references
    return len(names)


def _write_graph(src: Path, dst: Path, name: str) -> int:
    """Copy one graph into the layout (the decoder with `num_logits_to_keep`); weights over protobuf's 2 GB limit
    (export/onnx_export.EXTERNAL_DATA_BYTES, the one threshold) go to external data chunks of that size. Returns the
    number of external data files (0: one self-contained .onnx)."""
    import onnx

    from . import onnx_export

    model = onnx.load(str(src))  # loads a source's external data too
    if name == "decoder_model_merged":
        keep_last_logits(model)
    limit = onnx_export.EXTERNAL_DATA_BYTES
    weight_bytes = sum(len(t.raw_data) for t in model.graph.initializer)
    if weight_bytes > limit:
        return _save_in_chunks(model, dst, limit)
    onnx.checker.check_model(model)
    onnx.save_model(model, str(dst))
    return 0


def _transformers_js_config(model_dir: Path, dtype: str, external_chunks: dict[str, int]) -> dict:
    """config.json: the model's, with transformers.js' block; `use_external_data_format` maps each .onnx file with
    external data to its number of chunks (transformers.js fetches exactly those), false when there are none."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("gmaivl", None)  # our own extension; transformers.js would carry it along unread
    config["transformers.js_config"] = {"dtype": dtype,
                                        "use_external_data_format": dict(external_chunks) or False}
    return config


def export_transformers_js(model_dir, out_dir, *, quantize=(), block_size: int = 32, opset: int = 23,
                           held_out=None, min_agreement=None, max_new_tokens: int = 24) -> dict:
    """Export `model_dir` (a model folder) as a transformers.js folder in `out_dir`, with the `quantize` variants
    (names of quantize.VARIANTS) measured against the fp32 torch model on `held_out` (HeldOutItem list, default
    `quantize.default_held_out()`). A variant below its `min_agreement` greedy agreement (default
    quantize.MIN_AGREEMENT) is reported and not written. Returns the report: {"variants": {name: {...}},
    "shipped": [...], "rejected": [...]}. ModelError listing the reasons when transformers.js could not run it."""
    from .onnx_export import export_onnx

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"export: model folder {str(model_dir)!r} has no config.json")
    problems = transformers_js_problems(model_dir)
    if problems:
        raise ModelError(f"export --layout transformers.js: {model_dir} cannot run in transformers.js: "
                         + "; ".join(problems))
    thresholds = {**q.MIN_AGREEMENT, **(min_agreement or {})}
    config = GMAIVLConfig.from_pretrained(model_dir)
    with tempfile.TemporaryDirectory(prefix=".export-tjs-", dir=out_dir.parent if out_dir.parent.exists() else None) as work:
        work = Path(work)
        export_onnx(model_dir, work / "fp32", opset=opset)
        folders = {"fp32": work / "fp32"}
        if "q4f16" in quantize:
            export_onnx(model_dir, work / "fp16", dtype="fp16", opset=opset)
        for variant in quantize:
            folders[variant] = q.quantize_folder(work / "fp32", work / "fp16", variant, work / variant, block_size)
        report = {"model": model_dir.name, "block_size": block_size, "variants": {}, "shipped": ["fp32"],
                  "rejected": []}
        fp32_sizes = q.graph_sizes(folders["fp32"])
        if quantize:
            answers = q.reference_answers(model_dir, held_out or q.default_held_out(), max_new_tokens)
            report["held_out"] = len(answers)
        for variant, folder in folders.items():
            sizes = q.graph_sizes(folder)
            entry = {"bytes": sizes, "ratio_to_fp32": {g: sizes[g] / fp32_sizes[g] for g in sizes}}
            if quantize:
                entry.update(q.variant_agreement(folder, answers))
            if variant != "fp32":
                entry["min_agreement"] = thresholds[variant]
                ok = entry["greedy_agreement"] >= thresholds[variant]
                report["shipped" if ok else "rejected"].append(variant)
            report["variants"][variant] = entry
        with staged_files(out_dir, prefix=".export-") as tmp:
            (tmp / "onnx").mkdir()
            external_chunks = {}
            for variant in report["shipped"]:
                for name, file in GRAPH_FILES.items():
                    target = f"{name}{q.SUFFIXES[variant]}.onnx"
                    chunks = _write_graph(folders[variant] / file, tmp / "onnx" / target, name)
                    if chunks:
                        external_chunks[target] = chunks
            fp32 = folders["fp32"]
            for file in ("tokenizer.json", "special_tokens_map.json"):
                if (fp32 / file).is_file():
                    shutil.copyfile(fp32 / file, tmp / file)
            atomic_write_json(tmp / GENERATION_CONFIG, _generation_config(fp32 / GENERATION_CONFIG, model_dir))
            atomic_write_json(tmp / "tokenizer_config.json", _tokenizer_config(model_dir))
            preprocessor, processor = _processor_files(config)
            atomic_write_json(tmp / "preprocessor_config.json", preprocessor)
            atomic_write_json(tmp / "processor_config.json", processor)
            atomic_write_json(tmp / "config.json", _transformers_js_config(model_dir, "fp32", external_chunks))
            if quantize:
                atomic_write_json(tmp / REPORT_JSON, report)
    if not quantize:  # an earlier export's report would describe graphs no longer there
        (out_dir / REPORT_JSON).unlink(missing_ok=True)
    return report


def format_report(report: dict) -> str:
    """The report as a table: variant, decoder size and ratio, greedy and top-1 agreement, verdict."""
    lines = [f"{'variant':8} {'decoder bytes':>14} {'x fp32':>7} {'greedy':>7} {'top-1':>7}  verdict"]
    for name, entry in report["variants"].items():
        size = entry["bytes"]["decoder_model_merged"]
        ratio = entry["ratio_to_fp32"]["decoder_model_merged"]
        greedy = entry.get("greedy_agreement")
        top1 = entry.get("top1_agreement")
        verdict = ("reference" if name == "fp32" else
                   "shipped" if name in report["shipped"] else f"REJECTED (< {entry['min_agreement']:.2f})")
        cells = [f"{greedy:7.3f}" if greedy is not None else f"{'-':>7}", f"{top1:7.3f}" if top1 is not None else
                 f"{'-':>7}"]
        lines.append(f"{name:8} {size:14d} {ratio:7.3f} {cells[0]} {cells[1]}  {verdict}")
    return "\n".join(lines)

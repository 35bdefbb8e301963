"""`gmaivl-rt export tensorrt ONNX_DIR OUT_DIR`: TensorRT engines from the exported ONNX graphs.

One engine per graph, built with `trt.Builder` + `trt.OnnxParser`, fp16 or bf16, a timing cache file reused across
builds, and optimization profiles from min/opt/max sizes:
    vision_encoder:        num_images (and height/width in dynamic-resolution mode)
    embed_tokens:          batch_size, sequence_length
    decoder_model_merged:  profile 0 "prefill" (sequence_length range, past 0) and profile 1 "decode"
                           (sequence_length 1, past_sequence_length range); total = past + sequence;
                           num_logits (logits_indices' width) 1 at opt, up to sequence_length.
Graphs exported with `--attention trt_plugin` carry our Triton attention as the AOT plugin
"gmaivl::flash_attention" (see trt_plugin.py); it is registered before parsing, and its PTX ends up in the engine.

TensorRT is imported lazily: everything up to `build_engine` (profile arithmetic, plugin detection, the
op inventory check) runs without it. Written against the TensorRT >= 10.9 Python API.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

from gmaivl_rt.atomic import atomic_path, atomic_write_bytes, atomic_write_json

from gmaivl_rt.runtime.deploy_format import DEPLOY_JSON, ENGINE_FILES, ENGINE_JSON, GRAPH_FILES
from .op_inventory import check_graph
from .profiles import PRECISIONS, ProfileSizes, profile_shapes
from gmaivl_rt.runtime.trt_plugin import PLUGIN_ID, PLUGIN_NAME, PLUGIN_NAMESPACE, import_tensorrt, register_plugin

log = logging.getLogger(__name__)

PARSER_MIN_VERSION = (10, 15)  # the operator table export/tensorrt_onnx_ops.py was taken from


def graph_plugins(onnx_path: Path) -> set[str]:
    """Plugin ids ("namespace::name") the graph's custom-domain nodes ask for."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    found = set()
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            namespace = next((a.s.decode() for a in node.attribute if a.name == "plugin_namespace"), node.domain)
            found.add(f"{namespace}::{node.op_type}")
    return found


def build_engine(onnx_path: Path, engine_path: Path, profiles: list[dict], *, precision="fp16",
                 timing_cache: Path | None = None, workspace_bytes: int = 8 << 30) -> dict:
    """Parse one ONNX graph and build a serialized engine with the given profiles. Returns build facts."""
    trt, _ = import_tensorrt()
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    plugins = graph_plugins(onnx_path)
    if plugins - {PLUGIN_ID}:
        raise ValueError(f"{onnx_path.name}: unknown plugins {sorted(plugins - {PLUGIN_ID})}")
    if plugins:
        register_plugin()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # resolves external data beside the file
        errors = "\n".join(f"  node {e.node_name()!r} ({e.node_operator()}): {e.desc()}"
                           for e in (parser.get_error(i) for i in range(parser.num_errors)))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}:\n{errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    elif precision == "bf16":
        config.set_flag(trt.BuilderFlag.BF16)
    cache_bytes = timing_cache.read_bytes() if timing_cache is not None and timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in shapes.items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path.name} (see the log above)")
    atomic_write_bytes(engine_path, bytes(serialized))
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    return {"engine": engine_path.name, "plugins": sorted(plugins), "num_profiles": len(profiles),
            "profiles": [{k: [list(c) for c in v] for k, v in p.items()} for p in profiles]}


def export_tensorrt(onnx_dir, out_dir, *, precision="fp16", sizes: ProfileSizes | None = None,
                    timing_cache=None, workspace_gb: float = 8.0, graphs=tuple(GRAPH_FILES)) -> Path:
    """Build engines for every graph of an ONNX export folder into out_dir, with the deployment JSON copied
    beside them and `gmaivl_trt.json` describing engines and profiles. Returns the path of that JSON."""
    onnx_dir, out_dir = Path(onnx_dir), Path(out_dir)
    deploy_file = onnx_dir / DEPLOY_JSON
    if not deploy_file.is_file():
        raise FileNotFoundError(f"{onnx_dir}: no {DEPLOY_JSON}; run `gmaivl-rt export onnx` first")
    deploy = json.loads(deploy_file.read_text())
    sizes = sizes or ProfileSizes()
    # Everything that can fail without TensorRT fails before the (slow) builds start.
    for name in graphs:
        report = check_graph(onnx_dir / GRAPH_FILES[name], plugins={PLUGIN_ID})
        if not report.ok:
            raise ValueError(f"TensorRT cannot parse {GRAPH_FILES[name]}:\n{report}")
    plan = {name: profile_shapes(deploy, name, sizes) for name in graphs}
    # The graphs hold ONNX Attention and RMSNormalization nodes; TensorRT's parser reads the latter from 10.15.
    import_tensorrt(PARSER_MIN_VERSION, "the exported graphs' RMSNormalization/Attention nodes need")
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(timing_cache) if timing_cache else out_dir / "timing.cache"
    built = {}
    for name in graphs:
        log.info("building %s (%s)", ENGINE_FILES[name], precision)
        built[name] = build_engine(onnx_dir / GRAPH_FILES[name], out_dir / ENGINE_FILES[name], plan[name],
                                   precision=precision, timing_cache=cache, workspace_bytes=int(workspace_gb * 2**30))
    with atomic_path(out_dir / DEPLOY_JSON) as tmp:
        shutil.copyfile(deploy_file, tmp)
    for fname in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                  "generation_config.json"):  # the decoding defaults travel with the model
        if (onnx_dir / fname).is_file():
            with atomic_path(out_dir / fname) as tmp:
                shutil.copyfile(onnx_dir / fname, tmp)
    info = {"format": "gmaivl-rt-tensorrt", "format_version": 1, "precision": precision,
            "plugin": {"id": PLUGIN_ID, "namespace": PLUGIN_NAMESPACE, "name": PLUGIN_NAME},
            "sizes": {k: asdict(getattr(sizes, k)) for k in ("min", "opt", "max")}, "engines": built,
            "decoder_profiles": {"prefill": 0, "decode": 1}}
    path = out_dir / ENGINE_JSON
    atomic_write_json(path, info)
    return path

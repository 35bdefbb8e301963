"""`gmaivl-rt export onnx|tensorrt|check`: the command-line face of gmaivl_rt.export."""
from __future__ import annotations

import argparse
import sys

from .profiles import PRECISIONS, ProfileSizes, Sizes  # light: tensorrt_build itself pulls in triton


def register(subparsers):
    export = subparsers.add_parser("export", help="export a model to ONNX (ONNX Runtime) or TensorRT engines")
    sub = export.add_subparsers(dest="export_command", required=True)

    onnx = sub.add_parser("onnx", help="vision_encoder / embed_tokens / decoder_model_merged ONNX graphs + JSON")
    onnx.add_argument("model_dir", help="model folder (config.json + safetensors)")
    onnx.add_argument("out_dir", help="folder for the .onnx files and gmaivl_deploy.json")
    onnx.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                      help="weights and activations; bf16 graphs are for TensorRT (ONNX Runtime CPU lacks bf16)")
    onnx.add_argument("--opset", type=int, default=23, help="ONNX opset (>= 23 for the Attention op)")
    onnx.add_argument("--attention", choices=("sdpa", "trt_plugin"), default="sdpa",
                      help="sdpa: standard ONNX Attention (ONNX Runtime, TensorRT); trt_plugin: the vision "
                           "encoder's attention as our Triton TensorRT plugin (TensorRT only)")
    onnx.set_defaults(func=_onnx)

    trt = sub.add_parser("tensorrt", help="TensorRT engines from an ONNX export folder (needs tensorrt >= 10.15 "
                                                "and an NVIDIA GPU)")
    trt.add_argument("onnx_dir")
    trt.add_argument("out_dir")
    precision = trt.add_mutually_exclusive_group()
    for p in PRECISIONS:
        precision.add_argument(f"--{p}", dest="precision", action="store_const", const=p,
                               help=f"{p} engines" + (" (the default)" if p == "fp16" else ""))
    defaults = ProfileSizes()
    for corner in ("min", "opt", "max"):
        trt.add_argument(f"--{corner}", default="", metavar="K=V,...",
                         help=f"{corner} sizes of the optimization profiles, keys batch, images, seq, past, "
                              f"height, width (default {_describe(getattr(defaults, corner))})")
    trt.add_argument("--timing-cache", default=None, help="timing cache file (default OUT_DIR/timing.cache)")
    trt.add_argument("--workspace-gb", type=float, default=8.0)
    trt.set_defaults(func=_tensorrt, precision="fp16")

    check = sub.add_parser("check", help="check every node of an ONNX export against TensorRT's ONNX parser")
    check.add_argument("onnx_dir")
    check.set_defaults(func=_check)


def _describe(sizes: Sizes) -> str:
    return ",".join(f"{k}={getattr(sizes, k)}" for k in ("batch", "images", "seq", "past"))


def _onnx(args) -> int:
    from gmaivl_rt.extras import require
    from .onnx_export import export_onnx

    require("onnx", "onnxscript", "onnxruntime")

    path = export_onnx(args.model_dir, args.out_dir, dtype=args.dtype, opset=args.opset, attention=args.attention)
    print(f"wrote {path.parent} ({args.dtype}, opset {args.opset})")
    return _check(argparse.Namespace(onnx_dir=args.out_dir))


def _tensorrt(args) -> int:
    from .tensorrt_build import export_tensorrt

    defaults = ProfileSizes()
    sizes = ProfileSizes(**{c: Sizes.parse(getattr(args, c), getattr(defaults, c)) for c in ("min", "opt", "max")})
    try:
        path = export_tensorrt(args.onnx_dir, args.out_dir, precision=args.precision, sizes=sizes,
                               timing_cache=args.timing_cache, workspace_gb=args.workspace_gb)
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path.parent} ({args.precision})")
    return 0


def _check(args) -> int:
    from gmaivl_rt.extras import require
    from .op_inventory import check_folder

    require("onnx")
    from gmaivl_rt.runtime.trt_plugin import PLUGIN_ID

    reports = check_folder(args.onnx_dir, plugins={PLUGIN_ID})
    for report in reports:
        print(report)
    return 0 if all(r.ok for r in reports) else 1

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
    onnx.add_argument("out_dir", nargs="?", help="folder for the .onnx files and gmaivl_deploy.json (or --out)")
    onnx.add_argument("--out", dest="out_option", metavar="DIR", help="the output folder (instead of OUT_DIR)")
    onnx.add_argument("--layout", choices=("gmaivl", "transformers.js"), default="gmaivl",
                      help="gmaivl: the folder the onnx/tensorrt backends load; transformers.js: config.json, "
                           "processor files, tokenizer and onnx/*.onnx as transformers.js loads them "
                           "(docs/export.md#transformersjs)")
    onnx.add_argument("--quantize", default="", metavar="q8,q4,q4f16",
                      help="transformers.js layout: weight-only variants written beside the fp32 graphs "
                           "(ONNX Runtime's int8 dynamic and 4-bit MatMulNBits), each measured against the fp32 "
                           "torch model")
    onnx.add_argument("--block-size", type=int, default=32, choices=(32, 128), help="4-bit quantization block")
    onnx.add_argument("--agreement-set", default=None, metavar="FILE.jsonl",
                      help='held-out {"question", "image"} lines for the agreement report (default: 8 built-in '
                           "questions on synthetic images)")
    onnx.add_argument("--min-agreement", default="", metavar="q8=0.99,q4=0.95",
                      help="greedy-token agreement a variant needs to be written (default q8=0.99, q4=0.95, "
                           "q4f16=0.95); one below it is reported and left out")
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

    web = sub.add_parser("web", help="a static site that answers in the browser (transformers.js + onnxruntime-web) "
                                      "from a --layout transformers.js folder")
    web.add_argument("model_dir", help="a folder written by `export onnx ... --layout transformers.js`")
    web.add_argument("--out", required=True, metavar="DIR", help="the site's folder (serve it as static files)")
    web.add_argument("--js-modules", default=None, metavar="DIR",
                     help="node_modules holding @huggingface/transformers and onnxruntime-web (default: js/node_modules "
                          "of the checkout, from `make js`)")
    web.add_argument("--max-new-tokens", type=int, default=64, help="answer length the page asks for")
    web.add_argument("--no-webgpu", dest="webgpu", action="store_false",
                     help="always run on WebAssembly, even where the browser has WebGPU")
    web.set_defaults(func=_web)

    check = sub.add_parser("check", help="check every node of an ONNX export against TensorRT's ONNX parser")
    check.add_argument("onnx_dir")
    check.set_defaults(func=_check)


def _describe(sizes: Sizes) -> str:
    return ",".join(f"{k}={getattr(sizes, k)}" for k in ("batch", "images", "seq", "past"))


def _onnx(args) -> int:
    from gmaivl_rt.extras import require
    from .onnx_export import export_onnx

    require("onnx", "onnxscript", "onnxruntime")
    if (args.out_dir is None) == (args.out_option is None):
        print("error: give the output folder once: OUT_DIR or --out DIR", file=sys.stderr)
        return 2
    args.out_dir = args.out_dir or args.out_option
    if args.layout == "transformers.js":
        return _transformers_js(args)
    if args.quantize or args.agreement_set or args.min_agreement:
        print("error: --quantize, --agreement-set and --min-agreement go with --layout transformers.js",
              file=sys.stderr)
        return 2

    path = export_onnx(args.model_dir, args.out_dir, dtype=args.dtype, opset=args.opset, attention=args.attention)
    print(f"wrote {path.parent} ({args.dtype}, opset {args.opset})")
    return _check(argparse.Namespace(onnx_dir=args.out_dir))


def _transformers_js(args) -> int:
    from . import quantize as q
    from .transformers_js import REPORT_JSON, export_transformers_js, format_report

    if args.dtype != "fp32" or args.attention != "sdpa":
        print("error: --layout transformers.js exports fp32 graphs with the standard attention (pick lighter "
              "files with --quantize)", file=sys.stderr)
        return 2
    variants = q.parse_variants(args.quantize)
    held_out = q.read_held_out(args.agreement_set) if args.agreement_set else None
    report = export_transformers_js(args.model_dir, args.out_dir, quantize=variants, block_size=args.block_size,
                                    opset=args.opset, held_out=held_out,
                                    min_agreement=q.parse_thresholds(args.min_agreement))
    print(f"wrote {args.out_dir} (transformers.js layout: {', '.join(report['shipped'])})")
    if variants:
        print(format_report(report))
        print(f"report: {args.out_dir}/{REPORT_JSON}")
    if report["rejected"]:
        print(f"error: {', '.join(report['rejected'])} fell below the agreement threshold and were not written",
              file=sys.stderr)
        return 1
    return 0


def _web(args) -> int:
    from .web import export_web

    if args.max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    index = export_web(args.model_dir, args.out, js_modules=args.js_modules, max_new_tokens=args.max_new_tokens,
                       webgpu=args.webgpu)
    print(f"wrote {index.parent}: serve it as static files (e.g. python -m http.server -d {index.parent} "
          "--bind 127.0.0.1) and open index.html")
    return 0


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

"""`gmaivl-rt eval MODEL_DIR --data FILE --out DIR ...`, `gmaivl-rt eval score PREDICTIONS --data FILE --out DIR`
and `gmaivl-rt eval --demo MODEL_DIR --out DIR`, thin layers over `gmaivl_rt.eval.evaluate / score` and
`gmaivl_rt.eval.demo.run_eval_demo`."""
from __future__ import annotations

import argparse

from gmaivl_rt.eval.readers import FORMATS, PROTOCOLS
from gmaivl_rt.eval.report import summary_line

USAGE = """gmaivl-rt eval MODEL_DIR --data FILE --out DIR [options]   answer and score a benchmark
       gmaivl-rt eval score PREDICTIONS.jsonl --data FILE --out DIR   rescore saved predictions, no model
       gmaivl-rt eval --demo MODEL_DIR --out DIR                  the demo's held-out benchmark"""


def register(subparsers) -> None:
    # "eval" takes both a model folder and the "score" subcommand in its first position, which one argparse
    # parser cannot express; its arguments are parsed by `_run` (prefix "+" keeps argparse from reading them here).
    p = subparsers.add_parser("eval", help="answer and score medical benchmarks (VLMEvalKit TSV, HuatuoGPT-Vision, "
                                           "SLAKE, VQA-RAD, PMC-VQA); 'eval score' rescores predictions",
                              prefix_chars="+", add_help=False, usage=USAGE)
    p.add_argument("argv", nargs="*")
    p.set_defaults(func=_run)


def _common(parser: argparse.ArgumentParser, data_required: bool = True) -> None:
    parser.add_argument("--data", required=data_required, help="benchmark file: .tsv (VLMEvalKit), .json (HuatuoGPT-Vision, "
                                                      "SLAKE, VQA-RAD) or .csv (PMC-VQA, VQA-RAD rows)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--format", default="auto", choices=("auto",) + FORMATS)
    parser.add_argument("--protocol", default=None, choices=PROTOCOLS,
                        help="default: mcq for TSV / HuatuoGPT-Vision / PMC-VQA, closed-open for SLAKE / VQA-RAD")


def run_parser() -> argparse.ArgumentParser:
    from gmaivl_rt.runtime.cli import add_backend_options

    parser = argparse.ArgumentParser(prog="gmaivl-rt eval", usage=USAGE, description=__doc__)
    parser.add_argument("model", help="model folder (torch) or exported folder (onnx / tensorrt)")
    parser.add_argument("--demo", action="store_true", help="build and run the demo's held-out benchmark "
                                                           "(--data not needed)")
    _common(parser, data_required=False)
    add_backend_options(parser)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions")
    parser.add_argument("--resume", action="store_true", help="continue the run whose predictions.jsonl is in --out")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def score_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmaivl-rt eval score", description="rescore saved predictions")
    parser.add_argument("predictions", help="predictions.jsonl (lines with `index` and `prediction`)")
    _common(parser)
    return parser


def _run(args) -> int:
    argv = list(args.argv)
    if argv[:1] == ["score"]:
        from gmaivl_rt.eval import score

        ns = score_parser().parse_args(argv[1:])
        scores = score(ns.predictions, ns.data, ns.out, format=ns.format, protocol=ns.protocol)
        print(summary_line(scores))
        return 0
    from gmaivl_rt.runtime.cli import backend_options

    ns = run_parser().parse_args(argv)
    load_options = backend_options(ns)
    if ns.demo:
        from gmaivl_rt.eval.demo import run_eval_demo

        run_eval_demo(ns.model, ns.out, backend=ns.backend, batch_size=ns.batch_size, progress=not ns.no_progress,
                      **load_options)
        return 0
    if not ns.data:
        run_parser().error("--data is required (or --demo)")
    from gmaivl_rt.eval import evaluate

    scores = evaluate(ns.model, ns.data, ns.out, format=ns.format, protocol=ns.protocol, backend=ns.backend,
                      batch_size=ns.batch_size, limit=ns.limit, resume=ns.resume, progress=not ns.no_progress,
                      **load_options)
    print(summary_line(scores))
    return 0


"""`gmaivl-rt eval MODEL_DIR --data FILE --out DIR ...`, `gmaivl-rt eval score PREDICTIONS --data FILE --out DIR`
and `gmaivl-rt eval --demo MODEL_DIR --out DIR`, thin layers over `gmaivl_rt.eval.evaluate / score` and
`gmaivl_rt.eval.demo.run_eval_demo`."""
from __future__ import annotations

import argparse

from gmaivl_rt.eval.readers import FORMATS, LANGUAGES, PROTOCOLS
from gmaivl_rt.eval.report import summary_line
from gmaivl_rt.eval.scoring import CLOSED_OPEN_SCORERS, DEFAULT_CLOSED_OPEN_SCORER

USAGE = """gmaivl-rt eval MODEL_DIR --data FILE --out DIR [options]   answer and score a benchmark
       gmaivl-rt eval score PREDICTIONS.jsonl --data FILE --out DIR   rescore saved predictions, no model
       gmaivl-rt eval --demo MODEL_DIR --out DIR                  the demo's held-out benchmark
       gmaivl-rt eval merge SHARD_DIR... --out DIR                 join the runs of eval --shard I/N
       gmaivl-rt eval compare RUN_A RUN_B                         per-group differences, changed verdicts"""


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
    parser.add_argument("--scorer", default=None, choices=CLOSED_OPEN_SCORERS,
                        help=f"closed/open rule (SLAKE, VQA-RAD): LLaVA-Med's closed accuracy + open recall or "
                             f"lmms-eval's exact match (default {DEFAULT_CLOSED_OPEN_SCORER})")
    parser.add_argument("--lang", default="en", choices=LANGUAGES,
                        help="SLAKE questions by q_lang, as lmms-eval's slake_en / slake_zh (default en)")


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
    parser.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                        help="answer only batches I, I+N, ... (0 <= I < N); join the N folders with `eval merge`")
    parser.add_argument("--constrained", action="store_true",
                        help="decode multiple-choice items under choice = their option letters and yes/no questions "
                             "under choice = yes/no (recorded in run.json; not comparable with the kits' numbers)")
    return parser


def _shard(text: str) -> tuple[int, int]:
    index, _, count = text.partition("/")
    try:
        return int(index), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N (e.g. 0/4)") from None


def merge_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmaivl-rt eval merge", description="join the --out folders of "
                                     "`eval --shard I/N` for every I into one run, equal to the unsharded one")
    parser.add_argument("shards", nargs="+", help="the shards' --out folders")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def compare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gmaivl-rt eval compare", description="per-group differences between "
                                     "two runs of one benchmark (B - A, paired 95% bootstrap interval by image) and "
                                     "the items whose verdict changed")
    parser.add_argument("run_a", help="a run's --out folder or its predictions.jsonl")
    parser.add_argument("run_b")
    parser.add_argument("--max-changed", type=int, default=50, help="list at most this many changed items")
    return parser


def _print_comparison(result: dict, max_changed: int) -> None:
    print(f"{result['count']} items in both runs ({result['only_a']} only in A, {result['only_b']} only in B)")
    print(f"{'split':10s} {'group':40s} {'n':>6s} {'A':>7s} {'B':>7s} {'B-A':>7s}  95% CI")
    for g in result["groups"]:
        name = "overall" if g["column"] == "overall" else f"{g['column']}={g['value']}"
        low, high = g["ci95"]
        print(f"{str(g['split'] or '-')[:10]:10s} {name[:40]:40s} {g['count']:6d} {g['a']:7.1%} {g['b']:7.1%} "
              f"{g['difference']:+7.1%}  [{low:+.1%}, {high:+.1%}]")
    print(f"{len(result['changed'])} items changed verdict")
    for c in result["changed"][:max_changed]:
        print(f"  {c['index']}: A {c['a']!r} ({c['a_score']:g}) -> B {c['b']!r} ({c['b_score']:g}), answer "
              f"{c['answer']!r}")


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
        scores = score(ns.predictions, ns.data, ns.out, format=ns.format, protocol=ns.protocol, scorer=ns.scorer,
                       language=ns.lang)
        print(summary_line(scores))
        return 0
    if argv[:1] == ["merge"]:
        from gmaivl_rt.eval.run import merge

        ns = merge_parser().parse_args(argv[1:])
        print(summary_line(merge(ns.shards, ns.out)))
        return 0
    if argv[:1] == ["compare"]:
        from gmaivl_rt.eval.run import compare

        ns = compare_parser().parse_args(argv[1:])
        _print_comparison(compare(ns.run_a, ns.run_b), ns.max_changed)
        return 0
    from gmaivl_rt.runtime.cli import backend_options

    ns = run_parser().parse_args(argv)
    load_options = backend_options(ns)
    if ns.demo:
        from gmaivl_rt.eval.demo import run_eval_demo

        run_eval_demo(ns.model, ns.out, backend=ns.backend, batch_size=ns.batch_size, progress=not ns.no_progress,
                      constrained=ns.constrained, **load_options)
        return 0
    if not ns.data:
        run_parser().error("--data is required (or --demo)")
    from gmaivl_rt.eval import evaluate

    scores = evaluate(ns.model, ns.data, ns.out, format=ns.format, protocol=ns.protocol, backend=ns.backend,
                      batch_size=ns.batch_size, limit=ns.limit, resume=ns.resume, progress=not ns.no_progress,
                      scorer=ns.scorer, language=ns.lang, shard=ns.shard, constrained=ns.constrained, **load_options)
    print(summary_line(scores))
    return 0


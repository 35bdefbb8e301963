"""`gmaivl-rt data build`: the converter's command line (a thin layer over `build_dataset`)."""
from __future__ import annotations

import json
import logging


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="medical data pipeline")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    build = data_sub.add_parser(
        "build", help="convert DICOM / NIfTI / image datasets into GMAI-VL-format conversations",
        description="Convert source datasets into OUT/annotations/*.jsonl, OUT/images/, OUT/meta.json, "
                    "OUT/errors.jsonl and OUT/summary.{json,png}. A rerun with the same settings resumes.")
    source = build.add_mutually_exclusive_group(required=True)
    source.add_argument("--manifest", help="YAML or JSON manifest of labelled datasets")
    source.add_argument("--input", help="folder of unlabelled medical images (metadata-grounded captions)")
    source.add_argument("--demo", action="store_true", help="the DICOM / NIfTI files pydicom and nibabel ship")
    build.add_argument("--out", required=True, help="output folder")
    hook = build.add_mutually_exclusive_group()
    hook.add_argument("--rewriter", help="optional text rewriter 'package.module:function' (fn(text, context))")
    hook.add_argument("--rewriter-url", help="optional OpenAI-compatible server (POST /v1/chat/completions)")
    build.add_argument("--rewriter-model", default="default", help="model name sent to --rewriter-url")
    build.add_argument("--seed", type=int, default=0, help="seed of the template choices")
    build.add_argument("--workers", type=int, default=None,
                       help="processes converting items (default: every core; 1 = in this process); the output is "
                            "byte-identical whatever the count")
    build.add_argument("--shard", type=_shard_spec, default=None, metavar="I/N",
                       help="convert only shard I of N (0-based, a stable 1/N of the items) into OUT; join the N "
                            "shard folders with `gmaivl-rt data merge`")
    build.add_argument("--no-progress", action="store_true", help="no progress bar")
    build.set_defaults(func=_build)
    merge = data_sub.add_parser(
        "merge", help="join the shard folders of one `data build --shard I/N` run into one dataset",
        description="Merge shard outputs into OUT, identical to the unsharded build (annotations in the same order, "
                    "images stored once, errors and summary merged). Shards of different builds are refused.")
    merge.add_argument("shards", nargs="+", help="the shard output folders (all N of them)")
    merge.add_argument("--out", required=True, help="output folder")
    merge.set_defaults(func=_merge)
    synth = data_sub.add_parser(
        "synth", help="generate a medical VQA corpus with known answers (DICOM / NIfTI files plus a manifest)",
        description="Write OUT/files/ (DICOM CT, MR, CR/DX, US; NIfTI MR volumes), OUT/annotations/, OUT/labels.jsonl "
                    "and OUT/manifest.yaml for `data build --manifest`; with --benchmark, held-out benchmark files "
                    "(OUT/heldout.tsv, OUT/heldout_slake/) instead. Same --seed and --count, same bytes.")
    synth.add_argument("--out", required=True, help="output folder (new or empty, unless --resume / --overwrite)")
    synth.add_argument("--count", type=int, required=True, help="number of scenes (files) to generate")
    synth.add_argument("--seed", type=int, default=0, help="corpus seed (a benchmark uses a seed no corpus uses)")
    again = synth.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue an interrupted run in OUT (same settings)")
    again.add_argument("--overwrite", action="store_true", help="replace an earlier synth output in OUT")
    synth.add_argument("--benchmark", action="store_true",
                       help="write held-out benchmark files (VLMEvalKit TSV, SLAKE JSON) instead of a corpus")
    synth.add_argument("--workers", type=int, default=None,
                       help="processes rendering the scans (default: every core); the files are the same whatever "
                            "the count")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=_synth)


def _shard_spec(text: str) -> tuple[int, int]:
    import argparse

    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = None
    if not sep or index is None or count < 1 or not 0 <= index < count:
        raise argparse.ArgumentTypeError(f"{text!r} is not I/N with 0 <= I < N (e.g. 0/4)")
    return index, count


def _build(args) -> int:
    from gmaivl_rt.data.build import build_dataset
    from gmaivl_rt.data.rewriter import load_rewriter, openai_rewriter

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    rewriter = None
    if args.rewriter:
        rewriter = load_rewriter(args.rewriter)
    elif args.rewriter_url:
        rewriter = openai_rewriter(args.rewriter_url, model=args.rewriter_model)
    summary = build_dataset(args.out, manifest=args.manifest, input_dir=args.input, demo=args.demo,
                            rewriter=rewriter, seed=args.seed, progress=False if args.no_progress else None,
                            workers=args.workers, shard=args.shard)
    keys = ("records", "images_converted", "errors", "empty_slices_skipped", "by_modality", "by_task",
            "images_per_second")
    print(json.dumps({k: summary[k] for k in keys}, indent=2))
    return 0


def _merge(args) -> int:
    from gmaivl_rt.data.build import merge_shards

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = merge_shards(args.shards, args.out)
    print(json.dumps({k: summary[k] for k in ("records", "images_converted", "errors", "by_modality", "by_task")},
                     indent=2))
    return 0


def _synth(args) -> int:
    import sys

    from gmaivl_rt.data.synth import synthesize, write_benchmark
    from gmaivl_rt.data.synth.writer import check_count, check_workers, prepare_output

    if args.benchmark:
        from pathlib import Path

        from gmaivl_rt.atomic import atomic_write_json
        from gmaivl_rt.data.synth.writer import FORMAT, SETTINGS_FILE

        settings = {"format": FORMAT, "seed": args.seed, "count": check_count(args.count), "benchmark": True}
        prepare_output(Path(args.out), settings, resume=args.resume, overwrite=args.overwrite)
        atomic_write_json(Path(args.out) / SETTINGS_FILE, settings)
        summary = write_benchmark(args.out, args.count, args.seed)
    else:
        if args.workers is not None:
            check_workers(args.workers, "the number of rendering processes (--workers)")
        summary = synthesize(args.out, args.count, args.seed, resume=args.resume, overwrite=args.overwrite,
                             progress=not args.no_progress and sys.stderr.isatty(), workers=args.workers)
    print(json.dumps(summary, indent=2))
    return 0

"""`gmaivl-rt train` (one stage of the recipe) and `gmaivl-rt tokenizer` (a BPE for our presets)."""
from __future__ import annotations

import argparse
import json
import logging
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="run one GMAI-VL training stage (1 projector, 2 +vision, 3 all)",
        description="Run one GMAI-VL training stage; under torchrun it trains on all ranks "
                    "(e.g. torchrun --nproc_per_node 2 -m gmaivl_rt.cli train ...). Without --init the model "
                    "starts from random weights, and without --preset it is the tiny preset (for tests; the "
                    "demo uses compact).")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), help="the stage (required unless --resume)")
    p.add_argument("--data", help="data folder with meta.json (gmaivl-rt data build) or a meta-list "
                                  "(required unless --resume)")
    p.add_argument("--out", required=True, help="output folder: model, tokenizer, logs, checkpoints")
    p.add_argument("--config", help="extra YAML config layer (over train/configs/common, stageN, presets/PRESET)")
    p.add_argument("--preset", choices=("tiny", "compact", "gmai-vl-7b"),
                   help="model preset when there is no --init (default: --init's preset, else tiny, the test size)")
    p.add_argument("--init", help="previous stage's output folder (or any model folder) to start from; without it "
                                  "the model starts from random weights")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --init's, else trained on --data)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (schedule unchanged)")
    p.add_argument("--resume", nargs="?", const=True, choices=(True, "strict"), metavar="strict",
                   help="continue from OUT's newest complete checkpoint with the run's own settings "
                        "(OUT/train_config.yaml): flags left out are taken from it, flags that contradict it are "
                        "refused; a corrupt newest checkpoint is reported and the one before it used "
                        "(`--resume strict` stops at a corrupt one instead)")
    p.add_argument("--processes", type=int, default=1,
                   help="data-parallel ranks on this machine, one thread each (DDP over gloo on CPU; like torchrun "
                        "--standalone --nproc_per_node N; the global batch must split evenly among them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)

    t = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a built dataset's text")
    t.add_argument("--data", required=True, help="data folder with meta.json or a meta-list")
    t.add_argument("--out", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    t.add_argument("--vocab-size", type=int, default=2048,
                   help="the most tokens (a small dataset may give fewer: the size reached is reported)")
    t.add_argument("--min-frequency", type=int, default=2, help="merge only symbol pairs seen this often")
    t.set_defaults(func=_run_tokenizer)


def _run_train(args: argparse.Namespace) -> int:
    from .recipe import train

    if not args.resume and (args.stage is None or args.data is None):
        raise ValueError("train: --stage and --data are required (unless --resume continues a run in --out)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.processes != 1:
        from .launch import train_on_local_ranks

        if args.resume:
            raise ValueError("train --processes: --resume continues a run of local ranks under torchrun "
                             "(torchrun --standalone --nproc_per_node N -m gmaivl_rt.cli train --out OUT --resume)")
        summary = train_on_local_ranks(args.processes, args.stage, args.data, args.out, config=args.config,
                                       preset=args.preset, init=args.init, tokenizer=args.tokenizer,
                                       max_steps=args.max_steps, progress=not args.no_progress)
    else:
        summary = train(args.stage, args.data, args.out, config=args.config, preset=args.preset, init=args.init,
                        tokenizer=args.tokenizer, max_steps=args.max_steps, resume=args.resume,
                        progress=not args.no_progress)
    if os.environ.get("RANK", "0") == "0":  # under torchrun one result line, not one per rank
        print(json.dumps({k: summary[k] for k in ("out", "stage", "steps", "total_steps", "final_loss")}))
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import conversation_texts, train_bpe_tokenizer, vocab_size_shortfall

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tokenizer = train_bpe_tokenizer(conversation_texts(args.data), args.out, vocab_size=args.vocab_size,
                                    min_frequency=args.min_frequency)
    report = {"out": args.out, "vocab_size": len(tokenizer), "requested_vocab_size": args.vocab_size}
    shortfall = vocab_size_shortfall(len(tokenizer), args.vocab_size, args.min_frequency)
    if shortfall:
        report["note"] = shortfall
    print(json.dumps(report))
    return 0

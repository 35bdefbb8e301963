"""`gmaivl-rt train` (one stage of the recipe) and `gmaivl-rt tokenizer` (a BPE for our presets)."""
from __future__ import annotations

import argparse
import json
import logging


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="run one GMAI-VL training stage (1 projector, 2 +vision, 3 all)",
        description="Run one GMAI-VL training stage; under torchrun it trains on all ranks "
                    "(e.g. torchrun --nproc_per_node 2 -m gmaivl_rt.cli train ...).")
    p.add_argument("--stage", type=int, choices=(1, 2, 3), required=True)
    p.add_argument("--data", required=True, help="data folder with meta.json (gmaivl-rt data build) or a meta-list")
    p.add_argument("--out", required=True, help="output folder: model, tokenizer, logs, checkpoints")
    p.add_argument("--config", help="extra YAML config layer (over train/configs/common, stageN, presets/PRESET)")
    p.add_argument("--preset", choices=("tiny", "compact", "gmai-vl-7b"), help="model preset when there is no --init")
    p.add_argument("--init", help="previous stage's output folder (or any model folder) to start from")
    p.add_argument("--tokenizer", help="tokenizer folder (default: --init's, else trained on --data)")
    p.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (schedule unchanged)")
    p.add_argument("--resume", nargs="?", const=True, choices=(True, "strict"), metavar="strict",
                   help="continue from OUT's newest complete checkpoint (a corrupt newest one is reported and the "
                        "one before it used); `--resume strict` stops at a corrupt one instead")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_train)

    t = subparsers.add_parser("tokenizer", help="train a byte-level BPE tokenizer on a built dataset's text")
    t.add_argument("--data", required=True, help="data folder with meta.json or a meta-list")
    t.add_argument("--out", required=True, help="folder for tokenizer.json + tokenizer_config.json")
    t.add_argument("--vocab-size", type=int, default=2048)
    t.add_argument("--min-frequency", type=int, default=2)
    t.set_defaults(func=_run_tokenizer)


def _run_train(args: argparse.Namespace) -> int:
    from .recipe import train

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    summary = train(args.stage, args.data, args.out, config=args.config, preset=args.preset, init=args.init,
                    tokenizer=args.tokenizer, max_steps=args.max_steps, resume=args.resume,
                    progress=not args.no_progress)
    print(json.dumps({k: summary[k] for k in ("out", "stage", "steps", "total_steps", "final_loss")}))
    return 0


def _run_tokenizer(args: argparse.Namespace) -> int:
    from .tokenizer import conversation_texts, train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(conversation_texts(args.data), args.out, vocab_size=args.vocab_size,
                                    min_frequency=args.min_frequency)
    print(json.dumps({"out": args.out, "vocab_size": len(tokenizer)}))
    return 0

"""`gmaivl-rt demo --out DIR`: the whole flow on the embedded default data, in a few minutes on 2 CPU cores.

1. build the demo dataset from the DICOM and NIfTI files shipped with pydicom and nibabel (`gmaivl-rt data build
   --demo`), 2. train a byte-level BPE tokenizer on it, 3. train the `compact` preset through GMAI-VL's three
stages (`train/configs/demo.yaml`), 4. read a DICOM from the demo set, ask the stage III model a question about it
and print the answer, 5. score it on a held-out benchmark (`gmaivl_rt.eval.demo`) and print accuracy beside
chance. Everything lands under DIR (data/, tokenizer/, stage1..3/ with logs and loss.png, eval/).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEMO_DICOM = "CT_small.dcm"  # pydicom's own CT test file, part of the demo set
# The compact model learns from scratch on ~500 images, of which 3 are CT: it learns the plane of a slice but not
# yet the modality of a file it saw a handful of times, so the default question is about the plane (ask anything
# with --question; the reference answer printed beside it comes from the training data).
DEMO_QUESTION = "Which anatomical plane does this image show?"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build demo data, train the compact model through 3 stages, ask it "
                                           "about a DICOM")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--config", default=None, help="YAML config layer for the stages (default: the demo config)")
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    run_demo(args.out, config=args.config, question=args.question, progress=not args.no_progress)
    return 0


def _config_file() -> Path:
    from gmaivl_rt.train.config import CONFIG_DIR

    return CONFIG_DIR / "demo.yaml"


def run_demo(out="runs/demo", config=None, question: str = DEMO_QUESTION, progress: bool = True) -> dict:
    """Run the five steps; returns {"question", "answer", "reference", "seconds", "stages": [...], "eval": {...}}."""
    import logging

    from gmaivl_rt.data.build import build_dataset
    from gmaivl_rt.train.recipe import train
    from gmaivl_rt.train.config import read_yaml
    from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(out)
    config = Path(config) if config else _config_file()
    started = time.perf_counter()

    print(f"[1/5] building the demo dataset -> {out / 'data'}", flush=True)
    summary = build_dataset(out / "data", demo=True, progress=progress)
    print(f"      {summary['records']} conversations from {summary['images_converted']} images", flush=True)

    data = balanced_meta_list(out / "data", out / "demo_meta.json")
    tokenizer_cfg = read_yaml(config).get("tokenizer", {})
    vocab_size = int(tokenizer_cfg.get("vocab_size", 2048))
    print(f"[2/5] training a {vocab_size}-token byte-level BPE tokenizer -> {out / 'tokenizer'}", flush=True)
    train_bpe_tokenizer(conversation_texts(data), out / "tokenizer", vocab_size=vocab_size,
                        min_frequency=int(tokenizer_cfg.get("min_frequency", 2)))

    stages, init = [], None
    for stage in (1, 2, 3):
        print(f"[3/5] stage {stage} -> {out / f'stage{stage}'}", flush=True)
        result = train(stage, data, out / f"stage{stage}", config=config, init=init,
                       tokenizer=out / "tokenizer", progress=progress)
        stages.append({k: result[k] for k in ("stage", "steps", "final_loss")} |
                      {"first_loss": result["losses"][0] if result["losses"] else None})
        init = out / f"stage{stage}"

    print(f"[4/5] asking the stage III model about {DEMO_DICOM}", flush=True)
    answer = answer_about_dicom(init, _demo_dicom_path(), question)
    reference = _reference_answer(out / "data", question)
    print(f"[5/5] scoring the stage III model on a held-out benchmark -> {out / 'eval'}", flush=True)
    from gmaivl_rt.eval.report import summary_line
    from gmaivl_rt.eval.demo import run_eval_demo

    eval_scores = run_eval_demo(init, out / "eval", progress=progress)
    seconds = time.perf_counter() - started
    print()
    for s in stages:
        print(f"stage {s['stage']}: {s['steps']} steps, loss {s['first_loss']:.3f} -> {s['final_loss']:.3f}")
    print(f"loss curves: {init / 'loss.png'}")
    print(f"image:     {DEMO_DICOM} (pydicom test data, read with gmaivl_rt.medical.reader)")
    print(f"question:  {question}")
    print(f"answer:    {answer}")
    if reference:
        print(f"reference: {reference}  (the training data's answer for this file)")
    print(f"demo took {seconds:.0f} s")
    print(f"held-out benchmark: {summary_line(eval_scores)}  ({out / 'eval' / 'scores.png'})")
    result = {"question": question, "answer": answer, "reference": reference, "seconds": seconds,
              "stages": stages, "eval": {k: eval_scores[k] for k in ("overall", "chance", "count")}}
    from gmaivl_rt.atomic import atomic_write_json

    atomic_write_json(out / "demo_result.json", result)
    return result


def balanced_meta_list(data_dir: Path, path: Path) -> Path:
    """A meta-list over the built data whose `sample_ratio`s give every source as many records as the largest
    (the demo has ~7x more brain-MRI slices than DICOM images; GMAI-VL balances its sources the same way)."""
    from gmaivl_rt.atomic import atomic_write_json

    meta = json.loads((data_dir / "meta.json").read_text())
    largest = max(entry["length"] for entry in meta.values())
    rel = os.path.relpath(data_dir, path.parent)
    balanced = {name: {**entry, "image_dir": os.path.join(rel, entry["image_dir"]),
                       "annotations": os.path.join(rel, entry["annotations"]),
                       "sample_ratio": round(largest / max(1, entry["length"]), 3)}
                for name, entry in meta.items()}
    atomic_write_json(path, balanced)
    return path


def _demo_dicom_path() -> Path:
    import pydicom.data

    return Path(pydicom.data.__file__).parent / "test_files" / DEMO_DICOM


def answer_about_dicom(model_dir, dicom_path, question: str, max_new_tokens: int = 32) -> str:
    """The model in `model_dir` answers `question` about one DICOM (torch backend, GMAI-VL's demo settings)."""
    import gmaivl_rt

    return gmaivl_rt.load(model_dir).ask(question, Path(dicom_path), max_new_tokens=max_new_tokens)


def _reference_answer(data_dir: Path, question: str) -> str | None:
    """The demo data's answer to `question` for the demo DICOM, when the builder asked it (for comparison)."""
    stem = Path(DEMO_DICOM).stem
    for path in sorted((data_dir / "annotations").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if not str(record.get("id", "")).endswith("#" + stem):
                continue
            turns = record.get("conversations", [])
            for ask, reply in zip(turns, turns[1:]):
                if question in ask.get("value", "") and reply.get("from") == "gpt":
                    return reply["value"]
    return None

"""`gmaivl-rt demo --out DIR`: the whole flow, sized for about three minutes on 2 quiet CPU cores.

1. build the demo dataset from the DICOM and NIfTI files shipped with pydicom and nibabel (`gmaivl-rt data build
   --demo`), 2. generate a medical VQA corpus with known answers (`gmaivl-rt data synth`) and build it the same
way, 3. train a byte-level BPE tokenizer on both, 4. pretrain the vision tower on generated scans and their labels
(`gmaivl_rt.train.vision_pretrain`: GMAI-VL starts from a pretrained encoder), then train the `compact` preset
through GMAI-VL's three stages on the mix (`train/configs/demo.yaml`), 5. ask the stage III model a question about
CT_small.dcm, 6. score it on held-out scenes of an unseen seed, and score the same model with every image replaced
by one grey picture (the image-blind control). Everything lands under DIR (data/, synth/, synth_data/, tokenizer/,
vision/, stage1..3/ with logs and loss.png, eval/ with scores.json, blind/scores.json, slake/, report.png).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

DEMO_DICOM = "CT_small.dcm"  # pydicom's own CT test file, part of the demo set
# The default question is about the plane of CT_small (the check); ask anything with --question. The
# reference answer printed beside it comes from the training data, which holds this file among a few real ones.
DEMO_QUESTION = "Which anatomical plane does this image show?"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="build demo data, train the compact model through 3 stages, ask it "
                                           "about a DICOM, score it on held-out scenes")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--config", default=None, help="YAML config layer for the stages (default: the demo config)")
    p.add_argument("--long", action="store_true",
                   help="the longer run (the config's `long` block: more scenes and steps, about 20 minutes)")
    p.add_argument("--question", default=DEMO_QUESTION)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_run)

    v = subparsers.add_parser("vision-pretrain", help="pretrain the vision tower on generated scans and their labels "
                                                      "(the demo's step 4): a model folder for `train --stage 1 "
                                                      "--init`")
    v.add_argument("--out", required=True, help="output model folder (stage I's --init)")
    v.add_argument("--tokenizer", required=True, help="tokenizer folder (the one the stages will use)")
    v.add_argument("--config", default=None, help="config layer whose preset and `model:` block build the model and "
                                                  "whose `demo:` block gives the defaults below (default: the demo "
                                                  "config)")
    v.add_argument("--scenes", type=int, help="generated scans (default: the config's demo.vision_scenes)")
    v.add_argument("--seed", type=int, help="their seed (default: demo.synth_seed)")
    v.add_argument("--steps", type=int, help="optimizer steps (default: demo.vision_steps)")
    v.add_argument("--batch-size", type=int, help="pictures per step (default: demo.vision_batch_size)")
    v.add_argument("--lr", type=float, help="AdamW learning rate (default: demo.vision_lr)")
    v.add_argument("--workers", type=int, help="processes rendering the scans (default: demo.processes, at most "
                                               "the CPU cores)")
    v.add_argument("--no-progress", action="store_true")
    v.set_defaults(func=_run_vision)


def _run(args: argparse.Namespace) -> int:
    run_demo(args.out, config=args.config, question=args.question, progress=not args.no_progress, long=args.long)
    return 0


def _run_vision(args: argparse.Namespace) -> int:
    config = Path(args.config) if args.config else _config_file()
    settings, _ = demo_settings(config, long=False)
    options = _vision_options(settings)
    asked = {"scenes": args.scenes, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
             "lr": args.lr, "workers": args.workers}
    options.update({k: v for k, v in asked.items() if v is not None})
    print(f"vision pretraining on {options['scenes']} generated scans (seed {options['seed']}), {options['steps']} "
          f"steps -> {args.out}", flush=True)
    pretrain_vision_tower(Path(args.out), config, args.tokenizer, progress=not args.no_progress, **options)
    return 0


def _config_file() -> Path:
    from gmaivl_rt.train.config import CONFIG_DIR

    return CONFIG_DIR / "demo.yaml"


# The demo block of the config (train/configs/demo.yaml `demo:`), where a config leaves a key out.
DEMO_DEFAULTS = {"synth_scenes": 150, "synth_seed": 0, "heldout_scenes": 60, "shipped_share": 0.15,
                 "slake_limit": 120, "processes": 1, "vision_scenes": 0, "vision_steps": 800, "vision_batch_size": 32,
                 "vision_lr": 1.0e-3}


def training_processes(asked) -> int:
    """Stage III's data-parallel ranks: the demo config's `processes`, but no more than the CPU cores this process
    may use (each rank is one thread)."""
    if not isinstance(asked, int) or isinstance(asked, bool) or asked < 1:
        raise ValueError(f"demo.processes must be a positive whole number, got {asked!r}")
    from gmaivl_rt.processes import usable_cores

    return min(asked, usable_cores())


def demo_settings(config: Path, long: bool) -> tuple[dict, Path | None]:
    """(the demo block, the config file the stages read): with `long`, the config's `long:` block is merged over
    it and written beside the run (returned as the stages' config)."""
    from gmaivl_rt.train.config import deep_merge, read_yaml

    layer = read_yaml(config)
    if long:
        layer = deep_merge({k: v for k, v in layer.items() if k != "long"}, layer.get("long") or {})
    return {**DEMO_DEFAULTS, **(layer.get("demo") or {})}, layer


def run_demo(out="runs/demo", config=None, question: str = DEMO_QUESTION, progress: bool = True,
             long: bool = False) -> dict:
    """Run the six steps; returns {"question", "answer", "reference", "seconds", "stages": [...], "eval": {...},
    "blind": {...}}."""
    import logging

    import yaml

    from gmaivl_rt.atomic import atomic_write_text
    from gmaivl_rt.data.build import build_dataset
    from gmaivl_rt.data.synth import synthesize
    from gmaivl_rt.data.synth.writer import SETTINGS_FILE
    from gmaivl_rt.train.launch import train_on_local_ranks
    from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(out)
    settings, layer = demo_settings(Path(config) if config else _config_file(), long)
    config = out / "demo_config.yaml"
    atomic_write_text(config, yaml.safe_dump({k: v for k, v in layer.items() if k != "long"}, sort_keys=False))
    started = time.perf_counter()

    print(f"[1/6] building the demo dataset -> {out / 'data'}", flush=True)
    summary = build_dataset(out / "data", demo=True, progress=progress)
    print(f"      {summary['records']} conversations from {summary['images_converted']} images", flush=True)

    scenes, seed = int(settings["synth_scenes"]), int(settings["synth_seed"])
    print(f"[2/6] generating {scenes} scenes (seed {seed}) -> {out / 'synth'}, building -> {out / 'synth_data'}",
          flush=True)
    previous = out / "synth" / SETTINGS_FILE
    same = previous.is_file() and json.loads(previous.read_text()).get("count") == scenes and \
        json.loads(previous.read_text()).get("seed") == seed
    synthesize(out / "synth", scenes, seed, resume=same, overwrite=previous.is_file() and not same)
    synth_summary = build_dataset(out / "synth_data", manifest=out / "synth" / "manifest.yaml", progress=progress)
    print(f"      {synth_summary['records']} conversations from {scenes} generated scans", flush=True)

    data = mixed_meta_list({out / "synth_data": None, out / "data": float(settings["shipped_share"])},
                           out / "demo_meta.json")
    tokenizer_cfg = layer.get("tokenizer", {})
    vocab_size = int(tokenizer_cfg.get("vocab_size", 2048))
    print(f"[3/6] training a {vocab_size}-token byte-level BPE tokenizer -> {out / 'tokenizer'}", flush=True)
    train_bpe_tokenizer(conversation_texts(data), out / "tokenizer", vocab_size=vocab_size,
                        min_frequency=int(tokenizer_cfg.get("min_frequency", 2)))

    init = None
    if int(settings["vision_scenes"]) > 0:
        vision = _vision_options(settings)
        print(f"[4/6] vision pretraining on {vision['scenes']} generated scans (seed {vision['seed']}), "
              f"{vision['steps']} steps -> {out / 'vision'}", flush=True)
        init = pretrain_vision_tower(out / "vision", config, out / "tokenizer", progress=progress, **vision)
    stages = []
    ranks = training_processes(settings["processes"])
    for stage in (1, 2, 3):
        # stages I and II are a few steps: starting rank processes would cost more than they save
        n = ranks if stage == 3 else 1
        print(f"[4/6] stage {stage} -> {out / f'stage{stage}'}" + (f" ({n} ranks)" if n > 1 else ""), flush=True)
        result = train_on_local_ranks(n, stage, data, out / f"stage{stage}", config=config, init=init,
                                      tokenizer=out / "tokenizer", progress=progress)
        stages.append({k: result[k] for k in ("stage", "steps", "final_loss")} |
                      {"first_loss": result["losses"][0] if result["losses"] else None})
        init = out / f"stage{stage}"

    print(f"[5/6] asking the stage III model about {DEMO_DICOM}", flush=True)
    answer = answer_about_dicom(init, _demo_dicom_path(), question)
    reference = _reference_answer(out / "data", question)
    print(f"[6/6] scoring the stage III model on held-out scenes and its image-blind control -> {out / 'eval'}",
          flush=True)
    from gmaivl_rt.eval.demo import run_heldout_eval
    from gmaivl_rt.eval.report import summary_line

    scores = run_heldout_eval(init, out / "eval", scenes=int(settings["heldout_scenes"]),
                              slake_limit=settings["slake_limit"], progress=progress)
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
    print(f"held-out benchmark: {summary_line(scores['real'])}  ({out / 'eval' / 'report.png'})")
    print(f"image-blind control: {summary_line(scores['blind'])}")
    keys = ("overall", "chance", "count")
    result = {"question": question, "answer": answer, "reference": reference, "seconds": seconds,
              "stages": stages, "eval": {k: scores["real"][k] for k in keys} |
              {"by": scores["real"]["by"].get("category", {})},
              "blind": {k: scores["blind"][k] for k in keys} | {"by": scores["blind"]["by"].get("category", {})},
              "slake": {k: scores["slake"][k] for k in ("overall", "count", "closed", "open")}}
    from gmaivl_rt.atomic import atomic_write_json

    atomic_write_json(out / "demo_result.json", result)
    return result


def pretrain_vision_tower(target, config, tokenizer_dir, *, scenes: int, seed: int, steps: int, batch_size: int,
                          lr: float, workers: int = 1, progress: bool = True) -> Path:
    """The vision pretraining (`gmaivl_rt.train.vision_pretrain`; step 4 of the demo, `gmaivl-rt vision-pretrain`):
    the model stage I would build from `config` and the tokenizer, its vision tower and projector trained on
    `scenes` generated scans of `seed` (the corpus of that seed begins with the same scans; rendered in `workers`
    processes) and their labels; saved to `target`, a folder stage I takes as --init. Returns `target`."""
    from gmaivl_rt.data.synth.pictures import scene_labels, scene_pictures
    from gmaivl_rt.data.synth.writer import check_count, check_workers
    from gmaivl_rt.train.vision_pretrain import initial_model, pretrain_vision, save_vision_model

    check_count(scenes, "the number of scans (--scenes)")
    check_workers(workers, "the number of rendering processes (--workers)")
    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"tokenizer folder (--tokenizer) {tokenizer_dir}: no tokenizer.json in it")
    model, cfg = initial_model(config, tokenizer_dir)
    pictures = scene_pictures(seed, scenes, model.config.vision.image_size, progress=progress, workers=workers)
    summary = pretrain_vision(model, pictures, scene_labels(seed, scenes), steps=steps, batch_size=batch_size, lr=lr,
                              seed=seed, progress=progress)
    accuracy = ", ".join(f"{name} {100 * a:.0f} %" for name, a in summary["heldout_accuracy"].items())
    print(f"      {steps} steps in {summary['seconds']:.0f} s; its heads on the held-out tenth: {accuracy}",
          flush=True)
    return save_vision_model(model, target, tokenizer_dir=tokenizer_dir, preset=cfg["preset"], summary=summary)


def _vision_options(settings: dict) -> dict:
    """The demo block's vision_* settings as `pretrain_vision_tower` takes them."""
    return {"scenes": int(settings["vision_scenes"]), "seed": int(settings["synth_seed"]),
            "steps": int(settings["vision_steps"]), "batch_size": int(settings["vision_batch_size"]),
            "lr": float(settings["vision_lr"]), "workers": training_processes(settings["processes"])}


def balanced_meta_list(data_dir: Path, path: Path) -> Path:
    """A meta-list over the built data whose `sample_ratio`s give every source as many records as the largest
    (the demo has ~7x more brain-MRI slices than DICOM images; GMAI-VL balances its sources the same way)."""
    return mixed_meta_list({data_dir: None}, path, balance=True)


def mixed_meta_list(data_dirs: dict, path: Path, balance: bool = False) -> Path:
    """One meta-list over several built data folders. data_dirs: {folder: share}; share None keeps a folder's
    datasets as they are (sample_ratio 1, or balanced to its largest with `balance`); a number balances the
    folder's datasets among themselves and scales them so that the folder gives `share` x the records of the
    unscaled folders together."""
    from gmaivl_rt.atomic import atomic_write_json

    metas = {Path(d): json.loads((Path(d) / "meta.json").read_text()) for d in data_dirs}
    base_records = sum(e["length"] for d, m in metas.items() if data_dirs[d] is None for e in m.values())
    mixed = {}
    for folder, meta in metas.items():
        share = data_dirs[folder]
        largest = max(entry["length"] for entry in meta.values())
        ratios = {name: (largest / max(1, e["length"]) if (balance or share is not None) else 1.0)
                  for name, e in meta.items()}
        if share is not None:
            total = sum(ratios[n] * e["length"] for n, e in meta.items())
            ratios = {n: r * share * base_records / total for n, r in ratios.items()}
        rel = os.path.relpath(folder, path.parent)
        for name, entry in meta.items():
            mixed[name] = {**entry, "image_dir": os.path.join(rel, entry["image_dir"]),
                           "annotations": os.path.join(rel, entry["annotations"]),
                           "sample_ratio": round(ratios[name], 3)}
    atomic_write_json(path, mixed)
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

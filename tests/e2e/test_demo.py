"""`make demo`'s command (`gmaivl-rt demo`) end to end from the command line, cut to CI size, judged by what it
produces: the data build it uses, the three chained training stages, the answer and the held-out evaluation."""
from __future__ import annotations

import csv
import json
import os
import re
import shlex
from pathlib import Path

import pytest
import yaml
from pydicom.data import get_testdata_file
from run_outputs import all_moved, checkpoint_step, model_weights, read_jsonl, same_weights, split_weights

import gmaivl_rt

ROOT = Path(__file__).resolve().parents[2]
CT = get_testdata_file("CT_small.dcm")

# The demo config with the model and step counts cut to CI size (tiny preset, 2/2/3 steps): the demo entry, its
# data, tokenizer, three chained stages, the question and the held-out evaluation all run as `make demo` runs them.
SMALL_DEMO = {"preset": "tiny", "data": {"max_length": 256},
              "demo": {"synth_scenes": 10, "heldout_scenes": 10, "slake_limit": 12, "processes": 2,
                       "vision_scenes": 12, "vision_steps": 3, "vision_batch_size": 4},
              "batch": {"global_batch_size": 2},
              "schedule": {"warmup_ratio": 0.0}, "tokenizer": {"vocab_size": 512},
              "stages": {1: {"schedule": {"total_steps": 2}}, 2: {"schedule": {"total_steps": 2}},
                         3: {"schedule": {"total_steps": 3}, "optimizer": {"lr": 2.0e-3}}}}


def _make_demo_argv() -> list[str]:
    """`make demo`'s command line from the Makefile, without the venv path."""
    recipe = re.search(r"^demo:.*\n\t(.+)$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert recipe, "Makefile lost its demo target"
    argv = shlex.split(recipe.group(1))
    assert argv[0] == "$(BIN)/gmaivl-rt", argv
    return argv[1:]


def test_make_demo_command_end_to_end(tmp_path, cli_in_process, capsys):
    """`make demo`'s command (`gmaivl-rt demo --out runs/demo`) with `--config` cut to the tiny preset and a few
    steps (the full run, compact preset 8/6/100 steps, takes minutes: too slow for CI), after
    `gmaivl-rt data build --demo` into the demo's data folder. Checked: the demo used that build (resumed every
    item), each stage ran its steps and started from the one before (stage II leaves stage I's language model as it
    is, stage III changes it), the printed answer is what the stage III model says about CT_small.dcm, and the
    evaluation line is the stage III model's score on the held-out benchmark.
    Mutants: the demo not chaining the stages (`init=None` in its train call), asking or scoring the stage I
    model, stage III in one process although `demo.processes` asks for two ranks."""
    argv = _make_demo_argv()
    assert argv == ["demo", "--out", "runs/demo"]  # README: "`make demo` runs `gmaivl-rt demo --out runs/demo`"
    out = tmp_path / "runs/demo"
    config = tmp_path / "small_demo.yaml"
    config.write_text(yaml.safe_dump(SMALL_DEMO))

    built = json.loads(cli_in_process("data", "build", "--demo", "--out", out / "data", "--no-progress"))
    meta = json.loads((out / "data/meta.json").read_text())
    assert set(meta) == {"demo_dicom", "demo_nifti_brain_mri"} and built["errors"] == 0
    assert built["records"] == sum(m["length"] for m in meta.values()) >= 300
    assert {"CT", "MRI"} <= set(built["by_modality"])

    printed = cli_in_process(*argv[:2], out, "--config", config, "--no-progress")
    steps = [line.split("]")[0] + "]" for line in printed.splitlines() if re.match(r"\[\d/6\]", line)]
    assert steps == ["[1/6]", "[2/6]", "[3/6]", "[4/6]", "[4/6]", "[4/6]", "[4/6]", "[5/6]", "[6/6]"], printed
    synth = json.loads((out / "synth_data/summary.json").read_text())
    assert synth["errors"] == 0 and set(synth["by_modality"]) == {"CT", "MRI", "X-ray", "ultrasound"}
    mixed = json.loads((out / "demo_meta.json").read_text())
    assert {n for n in mixed if n.startswith("synth_")} and {"demo_dicom", "demo_nifti_brain_mri"} <= set(mixed)
    rebuilt = json.loads((out / "data/build_run.json").read_text())
    assert rebuilt["new_png_files"] == 0 and rebuilt["items_resumed"] > 0  # the CLI's build, resumed whole

    # the vision pretraining: the model stage I would build, its vision tower and projector trained, the rest as
    # built; stage I starts from it (and keeps its vision tower: frozen in stage I)
    from gmaivl_rt.train.vision_pretrain import initial_model

    initial_model(out / "demo_config.yaml", out / "tokenizer")[0].save_pretrained(tmp_path / "fresh")
    fresh = model_weights(tmp_path / "fresh")
    vision = model_weights(out / "vision")
    tower, rest = split_weights(vision, "vision_tower.")
    patches = [k for k in tower if "patch_embedding" in k]
    assert patches and all_moved({k: tower[k] for k in patches}, {k: fresh[k] for k in patches}, by=1e-6)
    assert same_weights({k: v for k, v in rest.items() if not k.startswith("multi_modal_projector.")},
                        {k: v for k, v in fresh.items() if k in rest and not k.startswith("multi_modal_projector.")})
    assert json.loads((out / "vision/vision_pretraining.json").read_text())["steps"] == 3
    assert same_weights(split_weights(model_weights(out / "stage1"), "vision_tower.")[0], tower)
    # `gmaivl-rt vision-pretrain` with the same config and tokenizer makes the same folder, bit for bit (the demo's
    # step and the command are one function); bad input is one line naming the option
    cli_in_process("vision-pretrain", "--out", tmp_path / "vision", "--tokenizer", out / "tokenizer", "--config",
                   config, "--no-progress")
    assert same_weights(model_weights(tmp_path / "vision"), vision)
    from gmaivl_rt.cli import main

    assert main(["vision-pretrain", "--out", str(tmp_path / "v0"), "--tokenizer", str(out / "tokenizer"),
                 "--config", str(config), "--scenes", "0"]) == 2
    assert main(["vision-pretrain", "--out", str(tmp_path / "v1"), "--tokenizer", str(tmp_path),
                 "--config", str(config)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert "--scenes" in errors[0] and "--tokenizer" in errors[1] and len(errors) == 2, errors
    assert not (tmp_path / "v0").exists() and not (tmp_path / "v1").exists()

    # the three stages: their steps, and each started from the one before
    weights = {s: model_weights(out / f"stage{s}") for s in (1, 2, 3)}
    ranks = min(2, len(os.sched_getaffinity(0)))  # stage III on the demo's data-parallel ranks, one per core
    for stage, total in ((1, 2), (2, 2), (3, 3)):
        assert checkpoint_step(out / f"stage{stage}") == total
        log = read_jsonl(out / f"stage{stage}/log.jsonl")
        assert len(log) == total and {r["ranks"] for r in log} == {ranks if stage == 3 else 1}
    lm1, rest1 = split_weights(weights[1], "language_model.")
    lm2, rest2 = split_weights(weights[2], "language_model.")
    lm3, _ = split_weights(weights[3], "language_model.")
    assert same_weights(lm2, lm1)  # frozen in stage II (and in stage I: equal also without chaining, same seed)
    # Stage II starts from stage I's trained projector: 2 AdamW steps move a weight by about lr each (exactly lr
    # on the first step), so it ends within 3 x the sum of its lrs of stage I's (a fresh start is ~1e-3 away).
    stage2_lrs = [r["lr"] for r in read_jsonl(out / "stage2/log.jsonl")]
    projector = [k for k in rest1 if k.startswith("multi_modal_projector.")]
    moves = [float((rest2[k] - rest1[k]).abs().max()) for k in projector]
    assert projector and 0 < max(moves) <= 3 * sum(stage2_lrs), (moves, stage2_lrs)
    assert all_moved(lm3, lm2, by=1e-4), "stage III trains the language model"
    # what loss.png plots: every stage's losses so far, carried from --init to --init
    history = read_jsonl(out / "stage3/history.jsonl")
    assert [(r["stage"], r["loss"]) for r in history] == [
        (r["stage"], r["loss"]) for s in (1, 2, 3) for r in read_jsonl(out / f"stage{s}/log.jsonl")]

    # the answer and the evaluation line are the stage III model's
    result = json.loads((out / "demo_result.json").read_text())
    stage3 = gmaivl_rt.load(out / "stage3")
    assert result["answer"] == stage3.ask(result["question"], CT, max_new_tokens=32)
    assert f"answer:    {result['answer']}\n" in printed
    assert result["reference"] and f"reference: {result['reference']}" in printed
    run = json.loads((out / "eval/run.json").read_text())
    assert Path(run["model"]) == out / "stage3" and run["status"] == "done"
    predictions = read_jsonl(out / "eval/predictions.jsonl")
    with open(out / "eval/heldout.tsv", newline="") as f:
        questions = list(csv.DictReader(f, delimiter="\t"))
    assert len(predictions) == len(questions) == result["eval"]["count"] > 20
    assert result["eval"]["overall"] == pytest.approx(sum(p["correct"] for p in predictions) / len(predictions))
    from gmaivl_rt.eval.report import summary_line

    scores = json.loads((out / "eval/scores.json").read_text())
    assert f"held-out benchmark: {summary_line(scores)}" in printed
    assert set(scores["by"]["category"]) <= {"modality", "region", "plane", "presence", "count", "side", "size"}
    # the image-blind control: the same questions, one grey image for all, the same stage III model
    blind = json.loads((out / "eval/blind/scores.json").read_text())
    blind_run = json.loads((out / "eval/blind/run.json").read_text())
    assert blind["count"] == scores["count"] and Path(blind_run["model"]) == out / "stage3"
    assert f"image-blind control: {summary_line(blind)}" in printed
    assert result["blind"]["overall"] == blind["overall"]
    assert (out / "eval/report.png").stat().st_size > 5_000
    assert (out / "stage3/loss.png").stat().st_size > 5_000

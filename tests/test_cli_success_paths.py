"""README commands whose success path had no test from the command line (issue 15 item 7), run through
`gmaivl-rt` (the CLI's main(argv), or the console script where the Python path matters) and judged by what they
produce, not by their exit code: `make demo`'s command, `data build --demo`, `data build --manifest` with
`--rewriter pkg.mod:fn`, `export onnx --dtype bf16`, and `train --init / --max-steps / --resume`.

(The README quick paths - `export onnx`, `ask --backend onnx`, `gmaivl-rt tokenizer`, `data build --manifest` on
the README's own manifest example - are checked the same way in tests/test_readme_quickpaths.py; transformers'
in-memory checkpoint names in tests/test_model.py.)
"""
from __future__ import annotations

import csv
import json
import logging
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

import gmaivl_rt
from gmaivl_rt.cli import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
CT = get_testdata_file("CT_small.dcm")


def _read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _run_cli(capsys, *argv) -> str:
    """`gmaivl-rt ARGV` in this process; its stdout (asserting exit code 0 with the output shown otherwise)."""
    code = cli_main([str(a) for a in argv])
    printed = capsys.readouterr()
    assert code == 0, f"gmaivl-rt {shlex.join(map(str, argv))}\n{printed.out[-2000:]}\n{printed.err[-2000:]}"
    return printed.out


def _weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def _checkpoint_step(out) -> int:
    from gmaivl_rt.train.checkpointing import latest_checkpoint, load_trainer_state

    checkpoint = latest_checkpoint(out)
    step = int(load_trainer_state(checkpoint)["step"])
    assert checkpoint.name == f"step-{step:08d}"
    return step


def _split(weights: dict, prefix: str) -> tuple[dict, dict]:
    """(the tensors under `prefix`, the rest)."""
    inside = {k: v for k, v in weights.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in weights.items() if k not in inside}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _all_moved(after: dict, before: dict, by: float) -> bool:
    return after.keys() == before.keys() and all(float((after[k] - before[k]).abs().max()) > by for k in after)


# ------------------------------------------------------------------------------------------------- make demo
# The demo config with the model and step counts cut to CI size (tiny preset, 2/2/3 steps): the demo entry, its
# data, tokenizer, three chained stages, the question and the held-out evaluation all run as `make demo` runs them.
SMALL_DEMO = {"preset": "tiny", "data": {"max_length": 256}, "batch": {"global_batch_size": 2},
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


def test_make_demo_command_end_to_end(tmp_path, capsys):
    """`make demo`'s command (`gmaivl-rt demo --out runs/demo`) with `--config` cut to the tiny preset and a few
    steps (the full run, compact preset 8/6/100 steps, takes minutes: too slow for CI), after
    `gmaivl-rt data build --demo` into the demo's data folder. Checked: the demo used that build (resumed every
    item), each stage ran its steps and started from the one before (stage II leaves stage I's language model as it
    is, stage III changes it), the printed answer is what the stage III model says about CT_small.dcm, and the
    evaluation line is the stage III model's score on the held-out benchmark.
    Mutants: the demo not chaining the stages (`init=None` in its train call), asking or scoring the stage I
    model."""
    argv = _make_demo_argv()
    assert argv == ["demo", "--out", "runs/demo"]  # README: "`make demo` runs `gmaivl-rt demo --out runs/demo`"
    out = tmp_path / "runs/demo"
    config = tmp_path / "small_demo.yaml"
    config.write_text(yaml.safe_dump(SMALL_DEMO))

    built = json.loads(_run_cli(capsys, "data", "build", "--demo", "--out", out / "data", "--no-progress"))
    meta = json.loads((out / "data/meta.json").read_text())
    assert set(meta) == {"demo_dicom", "demo_nifti_brain_mri"} and built["errors"] == 0
    assert built["records"] == sum(m["length"] for m in meta.values()) >= 300
    assert {"CT", "MRI"} <= set(built["by_modality"])

    printed = _run_cli(capsys, *argv[:2], out, "--config", config, "--no-progress")
    steps = [line.split("]")[0] + "]" for line in printed.splitlines() if re.match(r"\[\d/5\]", line)]
    assert steps == ["[1/5]", "[2/5]", "[3/5]", "[3/5]", "[3/5]", "[4/5]", "[5/5]"], printed
    rebuilt = json.loads((out / "data/build_run.json").read_text())
    assert rebuilt["new_png_files"] == 0 and rebuilt["items_resumed"] > 0  # the CLI's build, resumed whole

    # the three stages: their steps, and each started from the one before
    weights = {s: _weights(out / f"stage{s}") for s in (1, 2, 3)}
    for stage, total in ((1, 2), (2, 2), (3, 3)):
        assert _checkpoint_step(out / f"stage{stage}") == total
        assert len(_read_jsonl(out / f"stage{stage}/log.jsonl")) == total
    lm1, rest1 = _split(weights[1], "language_model.")
    lm2, rest2 = _split(weights[2], "language_model.")
    lm3, _ = _split(weights[3], "language_model.")
    assert _equal(lm2, lm1)  # frozen in stage II (and in stage I: equal also without chaining, same seed)
    # Stage II starts from stage I's trained projector: 2 AdamW steps move a weight by about lr each (exactly lr
    # on the first step), so it ends within 3 x the sum of its lrs of stage I's (a fresh start is ~1e-3 away).
    stage2_lrs = [r["lr"] for r in _read_jsonl(out / "stage2/log.jsonl")]
    projector = [k for k in rest1 if k.startswith("multi_modal_projector.")]
    moves = [float((rest2[k] - rest1[k]).abs().max()) for k in projector]
    assert projector and 0 < max(moves) <= 3 * sum(stage2_lrs), (moves, stage2_lrs)
    assert _all_moved(lm3, lm2, by=1e-4), "stage III trains the language model"
    # what loss.png plots: every stage's losses so far, carried from --init to --init
    history = _read_jsonl(out / "stage3/history.jsonl")
    assert [(r["stage"], r["loss"]) for r in history] == [
        (r["stage"], r["loss"]) for s in (1, 2, 3) for r in _read_jsonl(out / f"stage{s}/log.jsonl")]

    # the answer and the evaluation line are the stage III model's
    result = json.loads((out / "demo_result.json").read_text())
    stage3 = gmaivl_rt.load(out / "stage3")
    assert result["answer"] == stage3.ask(result["question"], CT, max_new_tokens=32)
    assert f"answer:    {result['answer']}\n" in printed
    assert result["reference"] and f"reference: {result['reference']}" in printed
    run = json.loads((out / "eval/run.json").read_text())
    assert Path(run["model"]) == out / "stage3" and run["status"] == "done"
    predictions = _read_jsonl(out / "eval/predictions.jsonl")
    with open(out / "eval/demo_benchmark.tsv", newline="") as f:
        questions = list(csv.DictReader(f, delimiter="\t"))
    assert len(predictions) == len(questions) == result["eval"]["count"] > 20
    assert result["eval"]["overall"] == pytest.approx(sum(p["correct"] for p in predictions) / len(predictions))
    from gmaivl_rt.eval.cli import summary_line

    scores = json.loads((out / "eval/scores.json").read_text())
    assert f"held-out benchmark: {summary_line(scores)}" in printed and "(chance 25.0%)" in printed
    assert (out / "stage3/loss.png").stat().st_size > 5_000


# ------------------------------------------------------------------------------------------------- export bf16
def _reference_run(graph_path: Path, feeds: dict) -> list[np.ndarray]:
    """A graph run by ONNX's reference evaluator (ONNX Runtime's CPU provider has no bf16 MatMul or Conv)."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(onnx.load(graph_path)).run(None, feeds)


def _float_initializers(model_path: Path) -> dict[str, tuple[str, int]]:
    """name -> (element type, element count) of a graph's floating-point initializers."""
    import onnx

    model = onnx.load(model_path)
    return {t.name: (onnx.TensorProto.DataType.Name(t.data_type), int(np.prod(t.dims)))
            for t in model.graph.initializer
            if t.data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)}


def test_export_onnx_bf16_from_the_command_line(tmp_path, capsys):
    """`gmaivl-rt export onnx MODEL OUT --dtype bf16` on a transformers-made checkpoint: every floating weight of
    the three graphs is bf16, logits come out fp32, the export passes the TensorRT operator check, and the graphs
    (run by ONNX's reference evaluator in bf16) give the next-token logits of the fp32 torch model within bf16's
    error: at most 4x that of the torch model loaded in bf16 (measured: 2.9e-3..3.9e-3 vs 2.5e-3..2.8e-3 on
    logits up to ~0.45; an fp32 graph is ~1e-6, which the weight dtype check refuses).
    Mutants: the CLI dropping --dtype (fp32 graphs), DTYPES["bf16"] = torch.float16, the decoder's logits left in
    the graph dtype (`.to(torch.float32)` dropped), the decoder skipping its final RMSNorm."""
    pytest.importorskip("onnxscript")
    import ml_dtypes
    from export_fixtures import graph_next_token_logits, hf_checkpoint
    from hf_reference import IMAGE_TOKEN

    from gmaivl_rt import GMAIVL

    out = tmp_path / "onnx_bf16"
    printed = _run_cli(capsys, "export", "onnx", hf_checkpoint(), out, "--dtype", "bf16")
    assert f"wrote {out} (bf16, opset 23)" in printed and "all supported by TensorRT" in printed
    deploy = json.loads((out / "gmaivl_deploy.json").read_text())
    assert deploy["dtype"] == "bf16"
    head_dim = GMAIVL.from_pretrained(hf_checkpoint()).config.text.head_dim
    for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        found = _float_initializers(out / f"{graph}.onnx")
        weights = {name: kind for name, (kind, _) in found.items() if name.endswith((".weight", ".bias"))}
        assert weights and set(weights.values()) == {"BFLOAT16"}, (graph, weights)
        # the one fp32 constant allowed: RoPE's inverse frequencies (head_dim / 2), fp32 in every graph dtype
        fp32 = {name: count for name, (kind, count) in found.items() if kind != "BFLOAT16"}
        assert set(fp32.values()) <= {head_dim // 2} and len(fp32) <= 1, (graph, fp32)
    logits_io = next(o for o in deploy["graphs"]["decoder_model_merged"]["outputs"] if o["name"] == "logits")
    assert logits_io["dtype"] == "float32"

    model = GMAIVL.from_pretrained(hf_checkpoint())
    torch.manual_seed(3)
    ids = torch.cat([torch.randint(0, 100, (3,)), torch.full((4,), IMAGE_TOKEN), torch.randint(0, 100, (5,))])[None]
    pixels = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        expected = model(ids, pixel_values=pixels).logits[0, -1]
        torch_bf16 = GMAIVL.from_pretrained(hf_checkpoint(), dtype=torch.bfloat16)(
            ids, pixel_values=pixels.bfloat16()).logits[0, -1].float()

    got = graph_next_token_logits(out, ids, pixels, IMAGE_TOKEN, _reference_run, float_dtype=ml_dtypes.bfloat16)
    error, torch_error = float((got - expected).abs().max()), float((torch_bf16 - expected).abs().max())
    assert 0 < error <= 4 * torch_error, (error, torch_error, float(expected.abs().max()))


# ------------------------------------------------------------------------------------------------- training
def test_train_init_max_steps_and_resume_from_the_command_line(tmp_path, capsys, caplog):
    """`gmaivl-rt train --stage 1 --init I`: the run starts from I (the frozen vision tower and language model
    stay I's bit for bit, the projector moves); `--max-steps 2` of a 4-step schedule stops with checkpoint step 2
    and the losses of the uninterrupted run's first two steps; `train --out O --resume` runs steps 3-4 only and
    ends with the uninterrupted run's losses and weights (fp32 on CPU: bit for bit).
    Mutants: the CLI dropping --init (random start) or --max-steps, the recipe ignoring the checkpoint --resume
    finds (a fresh run over the same folder: the same numbers, but steps 0..4), restore() skipping the
    scheduler's state."""
    from train_fixtures import make_training_setup, write_config

    from gmaivl_rt import GMAIVL, GMAIVLConfig
    from gmaivl_rt.train.recipe import _preset_config
    from gmaivl_rt.train.tokenizer import load_tokenizer, save_hf_tokenizer

    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(8, 4))
    tokenizer = load_tokenizer(tokenizer_dir)
    init = tmp_path / "init"
    torch.manual_seed(5)
    GMAIVL(_preset_config(GMAIVLConfig, "tiny", tokenizer)).save_pretrained(init)
    save_hf_tokenizer(tokenizer, init)  # --init's tokenizer is the run's (no --tokenizer below)
    config = write_config(tmp_path / "cfg.yaml", {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 4},
                                                  "optimizer": {"lr": 1e-3}, "train": {"save_every": 2}})
    flags = ["--stage", "1", "--data", data, "--init", init, "--config", config, "--no-progress"]

    full = json.loads(_run_cli(capsys, "train", "--out", tmp_path / "full", *flags))
    assert full["steps"] == full["total_steps"] == 4
    stopped = json.loads(_run_cli(capsys, "train", "--out", tmp_path / "cut", "--max-steps", "2", *flags))
    assert (stopped["steps"], stopped["total_steps"]) == (2, 4) and _checkpoint_step(tmp_path / "cut") == 2
    full_log, cut_log = _read_jsonl(tmp_path / "full/log.jsonl"), _read_jsonl(tmp_path / "cut/log.jsonl")
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log[:2]]

    start, after_two = _weights(init), _weights(tmp_path / "cut")
    moved, frozen = _split(after_two, "multi_modal_projector.")
    assert _equal(frozen, _split(start, "multi_modal_projector.")[1]), "--init's weights must be the start"
    assert _all_moved(moved, _split(start, "multi_modal_projector.")[0], by=1e-4)

    caplog.clear()
    caplog.set_level(logging.INFO)
    resumed = json.loads(_run_cli(capsys, "train", "--out", tmp_path / "cut", "--resume", "--no-progress"))
    assert resumed["steps"] == 4 and _checkpoint_step(tmp_path / "cut") == 4
    assert "steps 2..4 of 4" in caplog.text  # only the two steps left ran
    resumed_log = _read_jsonl(tmp_path / "cut/log.jsonl")
    assert resumed_log[:2] == cut_log  # the first two records kept as they were
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]
    assert [r["lr"] for r in resumed_log] == [r["lr"] for r in full_log]
    assert _equal(_weights(tmp_path / "cut"), _weights(tmp_path / "full"))


# ------------------------------------------------------------------------------------------------- data build
REWRITER_MODULE = '''
def rewrite(text, context):
    return "REWRITTEN " + text.upper() + " | " + str(context["label"])
'''


def _expected_rewrite(text: str, label) -> str:
    return "REWRITTEN " + text.upper() + " | " + str(label)


def test_data_build_manifest_with_a_rewriter_package_from_the_command_line(tmp_path, capsys):
    """`gmaivl-rt data build --manifest M --out D` gives, per annotated image, its caption and open and
    multiple-choice classification records with the image's label, and stores each picture once with its pixels;
    the same build through the console script with `--rewriter hooks.rewriting:rewrite` (a package found on
    PYTHONPATH, run from another folder) rewrites exactly the caption and classification answers: each is the
    rewriter applied to the plain build's answer; questions, ids, images and multiple-choice answers are unchanged.
    Mutants: the CLI not passing the rewriter on, `_rewrite` skipped, the rewriter's text dropped (templated text
    kept), load_rewriter importing only from the current folder, the manifest's modality override ignored."""
    sources = tmp_path / "sources"
    (sources / "images").mkdir(parents=True)
    labels = {"a.png": "normal", "b.png": "pneumonia", "c.png": "effusion"}
    pictures = {}
    for i, name in enumerate(labels):
        pixels = np.zeros((20 + 4 * i, 24, 3), np.uint8)
        pixels[..., i] = 60 + 50 * i
        pixels[5:9, 3:7] = 255
        Image.fromarray(pixels).save(sources / "images" / name)
        pictures[name] = pixels
    (sources / "cls.csv").write_text("image,label\n" + "".join(f"{n},{lab}\n" for n, lab in labels.items()))
    (sources / "m.yaml").write_text(yaml.safe_dump({"datasets": [{
        "name": "chest", "task": "classification", "image_root": "images", "annotations": "cls.csv",
        "labels": ["normal", "pneumonia", "effusion"], "modality": "X-ray"}]}))

    plain = tmp_path / "plain"
    printed = json.loads(_run_cli(capsys, "data", "build", "--manifest", sources / "m.yaml", "--out", plain,
                                  "--seed", "4", "--workers", "1", "--no-progress"))
    records = _read_jsonl(plain / "annotations/chest.jsonl")
    expected_ids = {f"2d#{kind}#x-ray#chest#{label}#{Path(name).stem}"
                    for name, label in labels.items() for kind in ("cap", "cls", "cls-mc")}
    assert {r["id"] for r in records} == expected_ids and printed["records"] == len(records) == 9
    assert json.loads((plain / "meta.json").read_text())["chest"]["length"] == 9
    for r in records:
        name = r["id"].split("#")[-1] + ".png"
        with Image.open(plain / "images" / r["image"]) as stored:
            assert np.array_equal(np.asarray(stored.convert("RGB")), pictures[name]), r["id"]
        assert (r["width"], r["height"]) == (24, pictures[name].shape[0])
        if "#cls#" in r["id"]:
            assert labels[name] in r["conversations"][1]["value"].lower()
    assert len(list((plain / "images").rglob("*.png"))) == 3

    hooks = tmp_path / "hooks_root" / "hooks"
    hooks.mkdir(parents=True)
    (hooks / "__init__.py").write_text("")
    (hooks / "rewriting.py").write_text(REWRITER_MODULE)
    console = Path(sys.executable).with_name("gmaivl-rt")
    command = [str(console)] if console.is_file() else [sys.executable, "-m", "gmaivl_rt.cli"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hooks.parent), os.environ.get("PYTHONPATH", "")])}
    work = tmp_path / "elsewhere"
    work.mkdir()
    run = subprocess.run([*command, "data", "build", "--manifest", str(sources / "m.yaml"), "--out",
                          str(tmp_path / "rewritten"), "--seed", "4", "--workers", "1", "--no-progress",
                          "--rewriter", "hooks.rewriting:rewrite"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rewritten = {r["id"]: r for r in _read_jsonl(tmp_path / "rewritten/annotations/chest.jsonl")}
    assert rewritten.keys() == expected_ids
    changed = 0
    for r in records:
        new = rewritten[r["id"]]
        assert new["image"] == r["image"]
        label = r["id"].split("#")[4]
        for turn, new_turn in zip(r["conversations"], new["conversations"], strict=True):
            if turn["from"] == "gpt" and r["id"].split("#")[1] in ("cap", "cls"):
                assert new_turn["value"] == _expected_rewrite(turn["value"], label), r["id"]
                changed += 1
            else:
                assert new_turn == turn, r["id"]
    assert changed >= 6

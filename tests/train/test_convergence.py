"""The whole training stack learns to look: a small preset trained from random weights through the three stages on a
small generated task (`data synth` -> `data build` -> tokenizer -> stages I, II, III) answers held-out questions
about scenes of an unseen seed far above chance, while the same model with every image replaced by one grey picture
(the image-blind control) stays near chance. It guards packing, loss masking, the vision path, the stage freezes and
the kernels' backward through the reference path: break any of them and the held-out accuracy falls.

The task: which imaging modality a generated scan is (CT, MRI, X-ray or ultrasound; VLMEvalKit multiple choice,
options shuffled per question, plus yes/no forms in training). Scored by `gmaivl_rt.eval` with VLMEvalKit's rules."""
import os

import pytest
import yaml

from gmaivl_rt.data.build import build_dataset
from gmaivl_rt.data.synth import (
    constant_image_tsv,
    synthesize,
    task_subset,
    write_benchmark,
)
from gmaivl_rt.eval.run import evaluate
from gmaivl_rt.train.recipe import train
from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer

TASK = "modality"
TRAIN_SCENES, HELD_OUT_SCENES = 160, 40
CONFIG = {"preset": "compact", "data": {"max_length": 384}, "batch": {"global_batch_size": 4},
          "schedule": {"warmup_ratio": 0.05, "min_lr_ratio": 0.1}, "train": {"save_every": 1000000},
          "stages": {1: {"schedule": {"total_steps": 4}}, 2: {"schedule": {"total_steps": 4}},
                     3: {"schedule": {"total_steps": 200}, "optimizer": {"lr": 1.0e-3}}}}


# Not met yet (2026-12-07): with dialogues, 16-token images and named options (docs/data.md) the held-out score at 200
# stage III steps rose from 25 % (the model answered "CT (D)" to everything) to 47 % of 32 (chance 25 %), short of
# 90 %: the from-scratch ViT needs more images than this budget shows it. strict: the day it passes, the mark must
# go (pytest reports XPASS as a failure).
# It costs about 7 minutes of this (shared) machine, over CI's ~90 s budget for it, to show a known shortfall, so it
# runs on demand: GMAIVL_CONVERGENCE=1.
@pytest.mark.skipif(not os.environ.get("GMAIVL_CONVERGENCE"), reason="not met yet (measured 47 % held-out at 200 "
                    "steps, goal 90 %; issue 24) and several minutes long: GMAIVL_CONVERGENCE=1 runs it")
@pytest.mark.xfail(strict=True, reason="the compact model does not yet reach 90 % held-out at this step budget "
                                       "(measured 47 %); issue 24")
def test_trained_model_answers_from_the_pixels(tmp_path):
    synthesize(tmp_path / "corpus", TRAIN_SCENES, seed=21)
    manifest = task_subset(tmp_path / "corpus", tmp_path / "task", [TASK], volumes=False)
    build_dataset(tmp_path / "data", manifest=manifest, progress=False, workers=2)
    train_bpe_tokenizer(conversation_texts(tmp_path / "data"), tmp_path / "tok", vocab_size=512)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(CONFIG))
    init = None
    for stage in (1, 2, 3):
        train(stage, tmp_path / "data", tmp_path / f"stage{stage}", config=config, init=init,
              tokenizer=tmp_path / "tok", progress=False)
        init = tmp_path / f"stage{stage}"

    write_benchmark(tmp_path / "eval", HELD_OUT_SCENES, seed=777_001)
    rows = (tmp_path / "eval" / "heldout.tsv").read_text().splitlines()
    header = rows[0].split("\t")
    task_rows = [rows[0]] + [r for r in rows[1:] if r.split("\t")[header.index("category")] == TASK]
    # the benchmark's first row of each scene carries its image; keep only the modality rows (each a first row)
    (tmp_path / "eval" / "task.tsv").write_text("\n".join(task_rows) + "\n")
    blind_tsv = constant_image_tsv(tmp_path / "eval" / "task.tsv", tmp_path / "eval" / "blind.tsv")
    real = evaluate(init, tmp_path / "eval" / "task.tsv", tmp_path / "eval" / "real", progress=False)
    blind = evaluate(init, blind_tsv, tmp_path / "eval" / "blind", progress=False)
    assert real["count"] == blind["count"] >= 25
    assert real["chance"] == pytest.approx(0.25)
    assert real["overall"] >= 0.90, real
    assert blind["overall"] <= 0.60, blind

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
# A language model smaller than compact's (128 wide, 2 layers) trains about twice as fast per step, and more steps of
# a small model beat fewer of a larger one at the same time (docs/evaluation.md).
CONFIG = {"preset": "compact", "data": {"max_length": 384}, "batch": {"global_batch_size": 4},
          "model": {"text": {"hidden_size": 128, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
                             "intermediate_size": 384}},
          "schedule": {"warmup_ratio": 0.05, "min_lr_ratio": 0.1}, "train": {"save_every": 1000000},
          "stages": {1: {"schedule": {"total_steps": 4}}, 2: {"schedule": {"total_steps": 4}},
                     3: {"schedule": {"total_steps": 600}, "optimizer": {"lr": 5.0e-4}}}}


# Not met yet (2026-12-07): 47 % of 32 held-out at 200 steps of the compact model (lr 1e-3); at 600 steps of the
# smaller language model above, 88 % (28 of 32, blind 25 %) in two runs at lr 5e-4 (with and without captions; 78 %
# at 1e-3): short of 90 %, and about 200 s of one core's CPU time, over CI's ~90 s budget for it. So it runs on demand
# (GMAIVL_CONVERGENCE=1); strict: the day it passes, the mark must go (pytest reports XPASS as a failure).
@pytest.mark.skipif(not os.environ.get("GMAIVL_CONVERGENCE"), reason="not met yet (measured 88 % held-out at 600 "
                    "steps, goal 90 %; issue 24) and minutes long: GMAIVL_CONVERGENCE=1 runs it")
@pytest.mark.xfail(strict=True, reason="the model does not yet reach 90 % held-out at this step budget "
                                       "(measured 88 %); issue 24")
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

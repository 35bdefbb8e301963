"""Resuming continues exactly: a run stopped after 4 of 6 steps and resumed from its checkpoint logs the same
losses (fp32 on CPU: bit-identical) and ends with the same weights as the uninterrupted run."""
import json

import torch
from safetensors.torch import load_file
from train_fixtures import make_training_setup

from gmaivl_rt import GMAIVL
from gmaivl_rt.train.recipe import train
from gmaivl_rt.train.checkpointing import latest_checkpoint, load_trainer_state

OVERRIDES = {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 6},
             "train": {"save_every": 2, "keep_last": 2}, "optimizer": {"lr": 1e-3}}


def _log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    data, tokenizer = make_training_setup(tmp_path)
    common = dict(preset="tiny", tokenizer=tokenizer, overrides=OVERRIDES, progress=False)
    full = train(3, data, tmp_path / "full", **common)
    stopped = train(3, data, tmp_path / "resumed", max_steps=4, **common)
    assert stopped["steps"] == 4 and stopped["total_steps"] == 6

    checkpoint = latest_checkpoint(tmp_path / "resumed")
    assert checkpoint.name == "step-00000004"
    assert sorted(p.name for p in checkpoint.parent.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert load_trainer_state(checkpoint)["step"] == 4
    GMAIVL.from_pretrained(checkpoint)  # the checkpoint's model part is a model folder

    resumed = train(3, data, tmp_path / "resumed", resume=True, **common)
    assert resumed["losses"] == full["losses"]
    assert [r["loss"] for r in _log(tmp_path / "resumed")] == [r["loss"] for r in _log(tmp_path / "full")]
    assert [r["lr"] for r in _log(tmp_path / "resumed")] == [r["lr"] for r in _log(tmp_path / "full")]
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    data, tokenizer = make_training_setup(tmp_path, records_per_source=(8, 4))
    overrides = {"batch": {"global_batch_size": 1}, "schedule": {"total_steps": 2}}
    result = train(1, data, tmp_path / "out", preset="tiny", tokenizer=tokenizer, resume=True,
                   overrides=overrides, progress=False)
    assert len(result["losses"]) == 2 and latest_checkpoint(tmp_path / "out").name == "step-00000002"

"""A training process SIGKILLed in the middle of writing a checkpoint leaves the previous checkpoint complete
and loadable, and `--resume` carries on from it (the half-written temp folder is swept away)."""
import os
import signal
import subprocess
import sys
import time

import torch
from train_fixtures import make_training_setup, write_config
from transformers import LlavaForConditionalGeneration

from gmaivl_rt import GMAIVL
from gmaivl_rt.train.recipe import train
from gmaivl_rt.train.checkpointing import PAUSE_ENV, TRAINER_STATE, latest_checkpoint, load_trainer_state

CONFIG = {"batch": {"global_batch_size": 1}, "schedule": {"total_steps": 4}, "train": {"save_every": 1}}


def test_kill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    data, tokenizer = make_training_setup(tmp_path, records_per_source=(8, 4))
    config = write_config(tmp_path / "cfg.yaml", CONFIG)
    out = tmp_path / "run"
    env = dict(os.environ, **{PAUSE_ENV: "2:120", "OMP_NUM_THREADS": "1"})
    proc = subprocess.Popen(
        [sys.executable, "-m", "gmaivl_rt.cli", "train", "--stage", "1", "--data", str(data), "--out", str(out),
         "--preset", "tiny", "--tokenizer", str(tokenizer), "--config", str(config), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline, lines = time.monotonic() + 150, []
    try:
        for line in proc.stdout:  # the hook prints once the weights of step 2 are written into the temp folder
            lines.append(line)
            if "pausing" in line or time.monotonic() > deadline:
                break
        assert any("pausing" in line for line in lines), "".join(lines[-30:])
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL

    root = out / "checkpoints"
    partial = list(root.glob(".tmp-step-00000002-*"))
    assert partial and not (partial[0] / TRAINER_STATE).exists()  # the kill landed inside the save
    checkpoint = latest_checkpoint(out)
    assert checkpoint.name == "step-00000001" and not (root / "step-00000002").exists()
    assert load_trainer_state(checkpoint)["step"] == 1
    # The surviving checkpoint is whole: transformers, reading the folder on its own, gives our logits (this used to
    # assert only that the model has parameters).
    model = GMAIVL.from_pretrained(checkpoint).eval()
    hf = LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    cfg = model.config
    ids = torch.tensor([[3, 4] + [cfg.image_token_index] * cfg.num_image_tokens + [5]])
    pixels = torch.randn(1, 3, cfg.vision.image_size, cfg.vision.image_size)
    with torch.no_grad():
        want = hf(input_ids=ids, pixel_values=pixels).logits
        torch.testing.assert_close(model(ids, pixel_values=pixels).logits, want, atol=1e-4, rtol=0)

    result = train(1, data, out, preset="tiny", tokenizer=tokenizer, config=config, resume=True, progress=False)
    assert result["steps"] == 4 and len(result["losses"]) == 4
    assert latest_checkpoint(out).name == "step-00000004"
    assert not list(root.glob(".tmp-*"))

"""Resuming continues exactly: a run stopped after 4 of 6 steps and resumed from its checkpoint logs the same
losses (fp32 on CPU: bit-identical) and ends with the same weights as the uninterrupted run. From the command line:
`train --init / --max-steps / --resume`, and a bare `--resume` restores the run's own settings and refuses flags
that contradict them."""
import json
import logging
import shutil

import torch
from run_outputs import all_moved, checkpoint_step, model_weights, read_jsonl, same_weights, split_weights
from safetensors.torch import load_file
from train_fixtures import make_init_model, make_training_setup, write_config

from gmaivl_rt import GMAIVL
from gmaivl_rt.cli import main as cli_main
from gmaivl_rt.train.checkpointing import latest_checkpoint, load_trainer_state
from gmaivl_rt.train.recipe import train

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


# ------------------------------------------------------------------------------------------------- command line
def test_train_init_max_steps_and_resume_from_the_command_line(tmp_path, cli_in_process, caplog):
    """`gmaivl-rt train --stage 1 --init I`: the run starts from I (the frozen vision tower and language model
    stay I's bit for bit, the projector moves); `--max-steps 2` of a 4-step schedule stops with checkpoint step 2
    and the losses of the uninterrupted run's first two steps; `train --out O --resume` runs steps 3-4 only and
    ends with the uninterrupted run's losses and weights (fp32 on CPU: bit for bit).
    Mutants: the CLI dropping --init (random start) or --max-steps, the recipe ignoring the checkpoint --resume
    finds (a fresh run over the same folder: the same numbers, but steps 0..4), restore() skipping the
    scheduler's state."""
    from gmaivl_rt.runtime.tokenizer import load_tokenizer
    from gmaivl_rt.train.tokenizer import save_hf_tokenizer

    data, tokenizer_dir = make_training_setup(tmp_path, records_per_source=(8, 4))
    tokenizer = load_tokenizer(tokenizer_dir)
    init = tmp_path / "init"
    make_init_model(init, tokenizer, seed=5)
    save_hf_tokenizer(tokenizer, init)  # --init's tokenizer is the run's (no --tokenizer below)
    config = write_config(tmp_path / "cfg.yaml", {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 4},
                                                  "optimizer": {"lr": 1e-3}, "train": {"save_every": 2}})
    flags = ["--stage", "1", "--data", data, "--init", init, "--config", config, "--no-progress"]

    full = json.loads(cli_in_process("train", "--out", tmp_path / "full", *flags))
    assert full["steps"] == full["total_steps"] == 4
    stopped = json.loads(cli_in_process("train", "--out", tmp_path / "cut", "--max-steps", "2", *flags))
    assert (stopped["steps"], stopped["total_steps"]) == (2, 4) and checkpoint_step(tmp_path / "cut") == 2
    full_log, cut_log = read_jsonl(tmp_path / "full/log.jsonl"), read_jsonl(tmp_path / "cut/log.jsonl")
    assert [r["loss"] for r in cut_log] == [r["loss"] for r in full_log[:2]]

    start, after_two = model_weights(init), model_weights(tmp_path / "cut")
    moved, frozen = split_weights(after_two, "multi_modal_projector.")
    assert same_weights(frozen, split_weights(start, "multi_modal_projector.")[1]), "--init's weights must be the start"
    assert all_moved(moved, split_weights(start, "multi_modal_projector.")[0], by=1e-4)

    caplog.clear()
    caplog.set_level(logging.INFO)
    resumed = json.loads(cli_in_process("train", "--out", tmp_path / "cut", "--resume", "--no-progress"))
    assert resumed["steps"] == 4 and checkpoint_step(tmp_path / "cut") == 4
    assert "steps 2..4 of 4" in caplog.text  # only the two steps left ran
    resumed_log = read_jsonl(tmp_path / "cut/log.jsonl")
    assert resumed_log[:2] == cut_log  # the first two records kept as they were
    assert [r["loss"] for r in resumed_log] == [r["loss"] for r in full_log]
    assert [r["lr"] for r in resumed_log] == [r["lr"] for r in full_log]
    assert same_weights(model_weights(tmp_path / "cut"), model_weights(tmp_path / "full"))


def test_resume_restores_the_runs_own_settings_and_refuses_contradicting_flags(tmp_path, capsys, caplog):
    """A run stopped early and resumed with only `--out O --resume` continues exactly like the same resume given
    every original flag (its config has a non-default lr and schedule, so a fresh default merge would differ);
    flags that contradict the saved run are refused, each named."""
    data, tokenizer = make_training_setup(tmp_path, records_per_source=(8, 4))
    config = write_config(tmp_path / "cfg.yaml", {"batch": {"global_batch_size": 2}, "schedule": {"total_steps": 3},
                                                  "optimizer": {"lr": 3e-3}, "train": {"save_every": 1}})
    flags = ["--stage", "3", "--data", str(data), "--preset", "tiny", "--tokenizer", str(tokenizer),
             "--config", str(config), "--no-progress"]
    stopped = tmp_path / "stopped"
    assert cli_main(["train", "--out", str(stopped), "--max-steps", "2"] + flags) == 0
    assert "starts from random weights" in caplog.text and "'tiny' preset" in caplog.text
    saved = (stopped / "train_config.yaml").read_text()
    shutil.copytree(stopped, tmp_path / "bare")
    capsys.readouterr()

    assert cli_main(["train", "--out", str(stopped), "--resume"] + flags) == 0
    assert cli_main(["train", "--out", str(tmp_path / "bare"), "--resume", "--no-progress"]) == 0
    full, bare = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert bare["steps"] == full["steps"] == bare["total_steps"] == 3
    assert read_jsonl(tmp_path / "bare/log.jsonl") and \
        [r["loss"] for r in read_jsonl(tmp_path / "bare/log.jsonl")] == \
        [r["loss"] for r in read_jsonl(stopped / "log.jsonl")]
    assert (tmp_path / "bare/train_config.yaml").read_text() == saved  # not overwritten by a fresh merge

    other = write_config(tmp_path / "other.yaml", {"batch": {"global_batch_size": 2},
                                                    "schedule": {"total_steps": 3}, "optimizer": {"lr": 1e-4},
                                                    "train": {"save_every": 1}})
    bad = [(["--preset", "compact"], "--preset compact (the run uses tiny)"),
           (["--stage", "2"], "--stage 2 (the run is stage 3)"),
           (["--config", str(other)], "optimizer.lr (0.003 -> 0.0001)"),
           (["--data", str(tmp_path)], f"--data {tmp_path} (the run used {data.resolve()})"),
           (["--init", str(stopped)], "--init"),
           (["--stage", "1", "--preset", "compact"], "--stage 1 (the run is stage 3); --preset compact")]
    for extra, named in bad:
        assert cli_main(["train", "--out", str(tmp_path / "bare"), "--resume", "--no-progress"] + extra) == 2
        err = capsys.readouterr().err
        assert "contradict" in err and named in err, (extra, err)
    assert (tmp_path / "bare/train_config.yaml").read_text() == saved
    # without a saved run there is nothing to restore: stage and data are required
    assert cli_main(["train", "--out", str(tmp_path / "new"), "--resume"]) == 2
    assert "give the stage and --data" in capsys.readouterr().err

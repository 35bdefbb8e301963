"""Training faults: a non-finite loss never reaches the weights (stop or skip), the log stays strict JSON, a
corrupt input model is refused before step 1, and resume survives (or reports) a bad checkpoint."""
import json
import logging
import math
import random
import re
from pathlib import Path

import pytest
import torch
from run_outputs import model_weights
from safetensors import safe_open
from train_fixtures import make_training_setup, write_config

from gmaivl_rt import GMAIVL, GMAIVLConfig
from gmaivl_rt.model.checkpoint import CheckpointError
from gmaivl_rt.errors import ModelError
from gmaivl_rt.train.recipe import train
from gmaivl_rt.train.checkpointing import latest_checkpoint, resume_checkpoint, verify_checkpoint
from gmaivl_rt.train.recipe import NonFiniteTrainingError, _preset_config
from gmaivl_rt.runtime.tokenizer import load_tokenizer


def _overrides(steps, **train_keys):
    return {"batch": {"global_batch_size": 1}, "schedule": {"total_steps": steps}, "optimizer": {"lr": 1e-3},
            "data": {"max_length": 128}, "train": {"save_every": 1, "keep_last": 10, **train_keys}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_training_setup(tmp_path_factory.mktemp("data"), records_per_source=(6, 4))


def _strict_log(out):
    """log.jsonl parsed as strict JSON: a bare NaN / Infinity fails the test."""
    def refuse(constant):
        raise AssertionError(f"log.jsonl holds {constant}, which is not JSON")
    return [json.loads(line, parse_constant=refuse) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture
def nan_at(monkeypatch):
    """nan_at({3}): the loss of the 3rd forward pass (= optimizer step 3 at one pack per step) becomes NaN."""
    calls, bad = [0], set()
    forward = GMAIVL.forward

    def poisoned(self, *args, **kwargs):
        output = forward(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] in bad and output.loss is not None:
            output.loss = output.loss * float("nan")
        return output

    monkeypatch.setattr(GMAIVL, "forward", poisoned)
    return bad.update


def test_nan_loss_stops_before_the_optimizer_step(tmp_path, setup, nan_at):
    data, tokenizer = setup
    nan_at({3})
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTrainingError, match=r"step 3: loss nan.*non-finite gradients.*parameter") as e:
        train(1, data, out, preset="tiny", tokenizer=tokenizer, overrides=_overrides(4), progress=False)
    assert "stays 'latest'" in str(e.value)
    assert latest_checkpoint(out).name == "step-00000002"
    assert not (out / "checkpoints" / "step-00000003").exists() and not (out / "model.safetensors").exists()
    log = _strict_log(out)
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[2]["loss"] is None and "loss" in log[2]["nonfinite"] and log[2]["skipped"] is True
    assert all(math.isfinite(r["loss"]) and "nonfinite" not in r for r in log[:2])
    assert all(bool(torch.isfinite(t).all()) for t in model_weights(latest_checkpoint(out)).values())


def test_nan_skip_drops_the_batch_and_stops_after_a_run_of_them(tmp_path, setup, nan_at):
    data, tokenizer = setup
    nan_at({2, 6, 7})
    out = tmp_path / "skip"
    result = train(1, data, out, preset="tiny", tokenizer=tokenizer, progress=False,
                   overrides=_overrides(4, nan_policy="skip", nan_max_skips=2))
    assert result["skipped_steps"] == 1 and result["steps"] == 4
    log = _strict_log(out)
    assert log[1]["loss"] is None and log[1]["skipped"] is True
    assert all("skipped" not in r for r in (log[0], log[2], log[3]))
    # The dropped step changed no weight: step 2's checkpoint equals step 1's; step 3 trained on.
    ckpt = out / "checkpoints"
    one, two, three = (model_weights(ckpt / f"step-0000000{i}") for i in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)
    assert not all(torch.equal(two[k], three[k]) for k in two)
    assert all(bool(torch.isfinite(t).all()) for t in model_weights(out).values())

    # A second run's steps 2 and 3 (forward calls 6 and 7) are two bad steps in a row: nan_max_skips=2 stops.
    with pytest.raises(NonFiniteTrainingError, match=r"step 3: .*2 non-finite steps in a row"):
        train(1, data, tmp_path / "skip2", preset="tiny", tokenizer=tokenizer, progress=False,
              overrides=_overrides(5, nan_policy="skip", nan_max_skips=2))
    assert latest_checkpoint(tmp_path / "skip2").name == "step-00000002"


def _overwrite_tensor_in_place(file, name, byte=0xFF):
    """Overwrite one tensor's bytes in a safetensors file (same size: the file still parses). 0xFF.. is NaN."""
    with safe_open(str(file), "pt") as f:
        assert name in f.keys()
    raw = file.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    start, end = json.loads(raw[8:8 + header_len])[name]["data_offsets"]
    base = 8 + header_len
    file.write_bytes(raw[:base + start] + bytes([byte]) * (end - start) + raw[base + end:])


@pytest.mark.parametrize("damage", ["overwritten in place", "saved with NaN"])
def test_input_model_with_nan_weights_is_refused_before_step_1(tmp_path, setup, damage):
    data, tokenizer = setup
    init = tmp_path / "init"
    model = GMAIVL(_preset_config(GMAIVLConfig, "tiny", load_tokenizer(tokenizer)))
    name = "multi_modal_projector.linear_1.weight"
    if damage == "saved with NaN":  # its digest matches: only the non-finite check can see it
        with torch.no_grad():
            model.get_parameter(name)[0, 0] = float("nan")
    model.save_pretrained(init)
    if damage == "overwritten in place":  # same size, still parses: the SHA-256 saved with it no longer matches
        _overwrite_tensor_in_place(init / "model.safetensors", name)
    reason = "SHA-256" if damage == "overwritten in place" else r"non-finite values \(NaN or inf\)"
    with pytest.raises(ModelError, match=rf"{name}.*{reason}|{reason}"):
        train(2, data, tmp_path / "out", init=init, tokenizer=tokenizer, overrides=_overrides(1), progress=False)
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / "log.jsonl").exists()


# ------------------------------------------------------------------------------------------------------ resume
@pytest.fixture(scope="module")
def four_checkpoints(setup, tmp_path_factory):
    """A finished 4-step run with a checkpoint after every step."""
    data, tokenizer = setup
    out = tmp_path_factory.mktemp("run") / "out"
    train(1, data, out, preset="tiny", tokenizer=tokenizer, overrides=_overrides(4), progress=False)
    return out


def _copy_run(source, tmp_path):
    import shutil

    return Path(shutil.copytree(source, tmp_path / "out"))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _scramble(path):
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))


CORRUPTIONS = {  # name: (damage to step-4, what the one-line report must say)
    "state truncated": (lambda c: _truncate(c / "trainer_state.pt"),
                        r"step-00000004/trainer_state\.pt: \d+ bytes, the manifest says \d+ \(truncated"),
    "state random bytes": (lambda c: _scramble(c / "trainer_state.pt"),
                           r"step-00000004/trainer_state\.pt: SHA-256 does not match"),
    "weights deleted": (lambda c: (c / "model.safetensors").unlink(),
                        r"step-00000004/model\.safetensors is missing"),
    "weights truncated": (lambda c: _truncate(c / "model.safetensors"),
                          r"step-00000004/model\.safetensors: \d+ bytes, the manifest says"),
    "state random, no manifest": (lambda c: ((c / "manifest.json").unlink(), _scramble(c / "trainer_state.pt")),
                                  r"step-00000004/trainer_state\.pt: not a readable trainer state"),
    "config deleted": (lambda c: (c / "config.json").unlink(), r"step-00000004/config\.json is missing"),
}


@pytest.mark.parametrize("damage", sorted(CORRUPTIONS))
def test_resume_reports_a_bad_checkpoint_and_falls_back(tmp_path, four_checkpoints, damage, caplog):
    out = _copy_run(four_checkpoints, tmp_path)
    corrupt, report = CORRUPTIONS[damage]
    corrupt(out / "checkpoints" / "step-00000004")
    with caplog.at_level(logging.WARNING, logger="gmaivl_rt.train.checkpointing"):
        folder, state, model = resume_checkpoint(out, GMAIVL.from_pretrained)
    assert folder.name == "step-00000003" and state["step"] == 3 and isinstance(model, GMAIVL)
    warnings = [r.getMessage() for r in caplog.records]
    assert any(re.search(report, w) for w in warnings), warnings
    assert all("\n" not in w for w in warnings)
    with pytest.raises(CheckpointError, match=report + r".*--resume strict"):
        resume_checkpoint(out, GMAIVL.from_pretrained, strict=True)


def test_resume_with_every_checkpoint_corrupt_is_one_clear_error(tmp_path, four_checkpoints):
    out = _copy_run(four_checkpoints, tmp_path)
    for folder in (out / "checkpoints").glob("step-*"):
        _truncate(folder / "trainer_state.pt")
    (out / "checkpoints" / "latest").write_text("step-00000099\n")  # names a checkpoint that is not there
    with pytest.raises(CheckpointError, match=r"no complete checkpoint to resume from \(5 checked"):
        resume_checkpoint(out, GMAIVL.from_pretrained)


def test_cli_resume_falls_back_and_reproduces_the_run_or_refuses_when_strict(tmp_path, setup, four_checkpoints,
                                                                              capsys):
    from gmaivl_rt.cli import main

    data, tokenizer = setup
    out = _copy_run(four_checkpoints, tmp_path)
    _truncate(out / "checkpoints" / "step-00000004" / "trainer_state.pt")
    config = write_config(tmp_path / "cfg.yaml", _overrides(4))
    argv = ["train", "--stage", "1", "--data", str(data), "--out", str(out), "--preset", "tiny", "--tokenizer",
            str(tokenizer), "--config", str(config), "--no-progress", "--resume"]
    assert main(argv + ["strict"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0]
    assert re.search(r"trainer_state\.pt: \d+ bytes, the manifest says .*--resume strict", err[0]), err

    assert main(argv) == 0
    resumed, original = _strict_log(out), _strict_log(four_checkpoints)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in original]  # step 4 redone bit-identically
    assert latest_checkpoint(out).name == "step-00000004"
    verify_checkpoint(out / "checkpoints" / "step-00000004")  # rewritten whole

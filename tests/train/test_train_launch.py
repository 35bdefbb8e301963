"""Local data-parallel ranks (`train.launch.train_on_local_ranks`, what the demo's stage III runs on) train like one
process with the same global batch, and a failing rank stops the run with one error naming it. Per-module learning
rates (`optimizer.lr_scale`) scale exactly the named modules' updates."""
import json

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import make_init_model, make_training_setup, write_config

from gmaivl_rt.train.launch import LaunchError, train_on_local_ranks
from gmaivl_rt.train.recipe import train

CONFIG = {"batch": {"global_batch_size": 4}, "schedule": {"total_steps": 3}, "optimizer": {"lr": 1e-3}}


@pytest.mark.slow
def test_two_local_ranks_train_like_one_process(tmp_path):
    """Same per-step losses (fp32 all-reduce order: rtol 1e-5) and the same weight updates (within 1 % of each
    update's norm) as `train` in this process. Mutant seen failing: every rank launched with WORLD_SIZE 1 (each
    trains alone on the whole batch: the losses agree but rank 0's checkpoint races with rank 1's)."""
    data, tokenizer = make_training_setup(tmp_path)
    make_init_model(tmp_path / "init", tokenizer)
    config = write_config(tmp_path / "cfg.yaml", CONFIG)
    ranks = train_on_local_ranks(2, 3, data, tmp_path / "ranks", config=config, init=tmp_path / "init",
                                 tokenizer=tokenizer, progress=False, timeout_s=240)
    single = train(3, data, tmp_path / "single", config=config, init=tmp_path / "init", tokenizer=tokenizer,
                   progress=False)
    assert ranks["steps"] == 3
    log = [json.loads(line) for line in (tmp_path / "ranks" / "log.jsonl").read_text().splitlines()]
    assert [r["ranks"] for r in log] == [2, 2, 2]  # one process group of two, not two runs of one
    torch.testing.assert_close(ranks["losses"], single["losses"], rtol=1e-5, atol=0)
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    a = load_file(str(tmp_path / "ranks" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    moved = 0
    for key in a:
        want, got = b[key] - init[key], a[key] - init[key]
        if key.endswith("k_proj.bias") or float(want.abs().max()) == 0:  # no gradient (softmax-invariant)
            continue
        moved += 1
        assert float((got - want).norm()) <= 1e-2 * float(want.norm()), key
    assert moved > len(a) // 2


@pytest.mark.slow
def test_a_failing_rank_stops_the_run_with_its_name(tmp_path):
    """A global batch of 3 cannot be split over 2 ranks: every rank refuses it, and the launcher says which rank
    failed and why, instead of hanging in the rendezvous."""
    data, tokenizer = make_training_setup(tmp_path)
    config = write_config(tmp_path / "cfg.yaml", dict(CONFIG, batch={"global_batch_size": 3}))
    with pytest.raises(LaunchError, match=r"rank \d of 2 exited with code 2"):  # the CLI's exit code for bad input
        train_on_local_ranks(2, 3, data, tmp_path / "ranks", config=config, tokenizer=tokenizer, progress=False,
                             timeout_s=120)


def test_lr_scale_scales_exactly_the_named_modules(tmp_path):
    """AdamW's first update is lr * g / (|g| + eps) per element, so with `lr_scale: {vision_tower: 4}` the vision
    tower moves exactly 4x as far as without it, and every other module exactly as far. Mutant seen failing: the
    factor applied to every group (the language model moves 4x too)."""
    data, tokenizer = make_training_setup(tmp_path)
    make_init_model(tmp_path / "init", tokenizer)
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    moves = {}
    for name, scale in (("plain", None), ("scaled", {"vision_tower": 4.0})):
        optimizer = dict(CONFIG["optimizer"], **({"lr_scale": scale} if scale else {}))
        config = write_config(tmp_path / f"{name}.yaml", dict(CONFIG, schedule={"total_steps": 1, "warmup_ratio": 0},
                                                               optimizer=optimizer))
        train(3, data, tmp_path / name, config=config, init=tmp_path / "init", tokenizer=tokenizer, progress=False)
        weights = load_file(str(tmp_path / name / "model.safetensors"))
        moves[name] = {k: weights[k] - init[k] for k in weights}
    vision = [k for k in init if k.startswith("vision_tower.") and float(moves["plain"][k].abs().max()) > 0]
    others = [k for k in init if not k.startswith("vision_tower.") and float(moves["plain"][k].abs().max()) > 0]
    assert vision and others
    for key in vision:
        torch.testing.assert_close(moves["scaled"][key], 4 * moves["plain"][key], rtol=1e-4, atol=1e-9)
    for key in others:
        torch.testing.assert_close(moves["scaled"][key], moves["plain"][key], rtol=1e-4, atol=1e-9)
    with pytest.raises(ValueError, match="lr_scale must map module paths to positive numbers"):
        train(3, data, tmp_path / "bad", config=write_config(tmp_path / "bad.yaml", dict(
            CONFIG, optimizer={"lr": 1e-3, "lr_scale": {"vision_tower": -1}})), init=tmp_path / "init",
            tokenizer=tokenizer, progress=False)

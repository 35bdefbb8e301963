"""Two gloo ranks under torchrun (DDP, or FSDP2 `fully_shard`; each rank reading its own packs) train like one
process with the same global batch: same per-step losses and final weights within fp32 tolerance (summation order
differs across the all-reduce: rtol 1e-5 on losses, atol 1e-5 on weights). FSDP2 runs its MixedPrecisionPolicy
with fp32 parameters (fp32 tolerance) and with bf16 parameters, the config default (bf16 tolerance)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_fixtures import make_init_model, make_training_setup, write_config

from gmaivl_rt.train.recipe import train
from gmaivl_rt.train.distributed import StepSampler

CONFIG = {"batch": {"global_batch_size": 4}, "schedule": {"total_steps": 3}, "optimizer": {"lr": 1e-3}}


def test_step_sampler_splits_each_global_batch_between_ranks():
    one = StepSampler(20, 4, rank=0, world_size=1, seed=5)
    ranks = [StepSampler(20, 4, rank=r, world_size=2, seed=5) for r in (0, 1)]
    for step in range(12):  # three epochs of 5 steps
        batch = one.rank_batch(step)
        assert sorted(ranks[0].rank_batch(step) + ranks[1].rank_batch(step)) == sorted(batch)
        assert not set(ranks[0].rank_batch(step)) & set(ranks[1].rank_batch(step))
    epoch0 = [i for step in range(5) for i in one.rank_batch(step)]
    assert sorted(epoch0) == list(range(20))  # every pack once per epoch
    assert epoch0 != [i for step in range(5, 10) for i in one.rank_batch(step)]  # reshuffled each epoch
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        StepSampler(20, 4, rank=0, world_size=3, seed=0)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        StepSampler(3, 4, rank=0, world_size=1, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("strategy, param_dtype, loss_rtol, update_rel", [
    ("ddp", "float32", 1e-5, 1e-2),
    ("fsdp", "float32", 1e-5, 1e-2),
    # bf16 compute (8 mantissa bits) with fp32 reduction: AdamW's sign-like first steps flip where a gradient
    # element is near zero, so the bf16 run's weight *update* is compared in norm, not elementwise.
    ("fsdp", "bfloat16", 2e-2, 0.25),
])
def test_two_gloo_ranks_match_one_process(tmp_path, strategy, param_dtype, loss_rtol, update_rel):
    """Both runs start from one saved checkpoint; each parameter's update (final - initial weights, ~2e-3 after 3
    AdamW steps at lr 1e-3) must agree within `update_rel` of its norm. The old elementwise atol 5e-3 exceeded the
    whole update, so an untrained model passed. Mutant: `optimizer.step()` dropped in the recipe (fails the
    moved check); the 2-rank run's gradients not all-reduced (fails the update comparison)."""
    data, tokenizer = make_training_setup(tmp_path)
    make_init_model(tmp_path / "init", tokenizer)
    config = write_config(tmp_path / "cfg.yaml", dict(CONFIG, distributed={"strategy": strategy,
                                                                          "fsdp_param_dtype": param_dtype}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "gmaivl_rt.cli", "train", "--stage", "3", "--data", str(data), "--out", str(tmp_path / "ddp"),
         "--init", str(tmp_path / "init"), "--tokenizer", str(tokenizer), "--config", str(config), "--no-progress"],
        env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 1 and results[0]["steps"] == 3, run.stdout  # rank 0 alone prints the result

    single = train(3, data, tmp_path / "single", init=tmp_path / "init", tokenizer=tokenizer, config=config,
                   progress=False)
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    assert len(ddp_log) == 3
    torch.testing.assert_close([r["loss"] for r in ddp_log], single["losses"], rtol=loss_rtol, atol=0)
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    moved = 0
    for key in a:
        assert a[key].dtype == torch.float32  # FSDP2 keeps fp32 master weights; bf16 is compute only
        want, got = b[key] - init[key], a[key] - init[key]
        if key.endswith("k_proj.bias") or float(want.abs().max()) == 0:  # no gradient (frozen, or softmax-invariant)
            continue
        moved += 1
        assert float(want.abs().max()) > 1e-4, key
        assert float((got - want).norm()) <= update_rel * float(want.norm()), key
    assert moved > len(a) // 2
    # The 2-rank run's last checkpoint (written by rank 0 after gathering) holds the same weights as its model.
    last = load_file(str(tmp_path / "ddp" / "checkpoints" / "step-00000003" / "model.safetensors"))
    assert all(torch.equal(a[k], last[k]) for k in a)

"""Training checkpoints: atomic, resumable, and the model part loadable by `GMAIVL.from_pretrained`.

Layout under `OUT/checkpoints/`:
    step-00000012/   config.json + *.safetensors (GMAIVL.save_pretrained), trainer_state.pt
                     (optimizer, scheduler, every rank's RNG states, step = data position, trainer counters)
    latest           the name of the newest complete checkpoint
A checkpoint is written into `.tmp-step-*`, every file fsynced, then renamed into place with os.replace and only
then named in `latest`; older ones beyond `keep_last` are removed afterwards. A process killed at any moment
leaves either the old or the new checkpoint complete, and the stale temp dir is swept on the next save.
"""
from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gmaivl_rt.atomic import atomic_write_text

from .distributed import DistInfo, barrier, unwrap

TRAINER_STATE = "trainer_state.pt"
# Test hook: "STEP:SECONDS" pauses the save of that step after the weights are written and before the trainer
# state, so a test can SIGKILL the process in the middle of a save.
PAUSE_ENV = "GMAIVL_TRAIN_SAVE_PAUSE"


def checkpoints_dir(out) -> Path:
    return Path(out) / "checkpoints"


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_model(model: torch.nn.Module, path, info: DistInfo) -> None:
    """Save the (possibly sharded) model with `GMAIVL.save_pretrained` into `path` on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    inner = unwrap(model)
    sharded = info.enabled and not hasattr(model, "module")  # FSDP2 shards in place; DDP keeps `.module`
    if not sharded:
        if info.is_main:
            inner.save_pretrained(path)
        return
    full = get_model_state_dict(model, options=_full_state_options())  # every rank takes part in the gather
    if info.is_main:
        with torch.device("meta"):
            plain = type(inner)(inner.config)
        plain.load_state_dict(full, assign=True)
        plain.save_pretrained(path)


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def _pause_if_requested(step: int) -> None:
    spec = os.environ.get(PAUSE_ENV)
    if spec:
        at, seconds = spec.split(":")
        if int(at) == step:
            print(f"[checkpoint] pausing {seconds}s inside the save of step {step}", flush=True)
            time.sleep(float(seconds))


def save_checkpoint(out, step: int, model, optimizer, scheduler, trainer: dict, info: DistInfo,
                    keep_last: int = 2) -> Path:
    """Write checkpoint `step` (optimizer steps done). Collective: every rank calls it. Returns its folder."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    root = checkpoints_dir(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    options = _full_state_options() if info.enabled else None
    optim_state = get_optimizer_state_dict(model, optimizer, options=options)
    rngs = [None] * info.world_size
    if info.enabled:
        dist.all_gather_object(rngs, rng_state())
    else:
        rngs = [rng_state()]
    if info.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-step-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    barrier(info)
    write_model(model, tmp, info)
    if info.is_main:
        _pause_if_requested(step)
        torch.save({"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(), "rng": rngs,
                    "trainer": trainer, "world_size": info.world_size}, tmp / TRAINER_STATE)
        _fsync_tree(tmp)
        if final.exists():  # a rerun reaching the same step: move the old one aside, then swap
            old = root / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        atomic_write_text(root / "latest", final.name + "\n")
        for older in sorted(root.glob("step-*"))[:-keep_last] if keep_last > 0 else []:
            if older != final:
                shutil.rmtree(older, ignore_errors=True)
    barrier(info)
    return final


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def latest_checkpoint(out) -> Path | None:
    """The newest complete checkpoint: the one `latest` names, else the highest `step-*` holding its state."""
    root = checkpoints_dir(out)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if (named / TRAINER_STATE).is_file():
            return named
    complete = [p for p in sorted(root.glob("step-*")) if (p / TRAINER_STATE).is_file()]
    return complete[-1] if complete else None


def load_trainer_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / TRAINER_STATE, map_location="cpu", weights_only=False)


def restore(state: dict, model, optimizer, scheduler, info: DistInfo) -> int:
    """Put optimizer, scheduler and this rank's RNG back from `load_trainer_state`; returns the step to start at.
    The weights come from the checkpoint folder itself (`GMAIVL.from_pretrained`) before the model is wrapped."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if state["world_size"] != info.world_size:
        raise ValueError(f"checkpoint was written by {state['world_size']} ranks; resume it with the same number "
                         f"(got {info.world_size}) so every rank reads the same data shard")
    # strict=False: a trainable parameter that never got a gradient (the vision layers past feature_layer) has no
    # AdamW state yet, exactly as in the uninterrupted run.
    options = StateDictOptions(full_state_dict=info.enabled, strict=False)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state["optimizer"], options=options)
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][info.rank])
    return int(state["step"])

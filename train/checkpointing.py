"""Training checkpoints: atomic, resumable, and the model part loadable by `GMAIVL.from_pretrained`.

Layout under `OUT/checkpoints/`:
    step-00000012/   config.json + *.safetensors (GMAIVL.save_pretrained), trainer_state.pt
                     (optimizer, scheduler, every rank's RNG states, step = data position, trainer counters),
                     manifest.json (every file's size, and the SHA-256 of each file that is not safetensors)
    latest           the name of the newest complete checkpoint
A checkpoint is written into `.tmp-step-*`, every file fsynced, then renamed into place with os.replace and only
then named in `latest`; older ones beyond `keep_last` are removed afterwards. A process killed at any moment
leaves either the old or the new checkpoint complete, and the stale temp dir is swept on the next save.

Resume (`resume_checkpoint`) verifies a checkpoint before using it: manifest sizes and digests, then the trainer
state (a torch file read with weights_only=True, never unpickled freely) and the weights. A corrupt or incomplete
checkpoint is reported in one line naming the file and the problem, and the next older complete one is used
(unless `strict`).
"""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from gmaivl_rt.atomic import atomic_write_json, atomic_write_text, file_sha256
from gmaivl_rt.model.checkpoint import CheckpointError
from gmaivl_rt.errors import ModelError

from .distributed import DistInfo, barrier, unwrap

logger = logging.getLogger(__name__)
TRAINER_STATE = "trainer_state.pt"
MANIFEST = "manifest.json"
_STATE_KEYS = ("step", "optimizer", "scheduler", "rng", "world_size")
# Test hook: "STEP:SECONDS" pauses the save of that step after the weights are written and before the trainer
# state, so a test can SIGKILL the process in the middle of a save.
PAUSE_ENV = "GMAIVL_TRAIN_SAVE_PAUSE"


def checkpoints_dir(out) -> Path:
    return Path(out) / "checkpoints"


def _full_state_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def rng_state() -> dict:
    """Every RNG's state in types `torch.load(weights_only=True)` accepts (numpy's key array as a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                   "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
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
        write_manifest(tmp, step)
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


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: each file's size, plus its SHA-256 unless it is safetensors (those carry their own digests,
    checked when the weights load)."""
    files = {}
    for path in sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST):
        files[path.name] = {"bytes": path.stat().st_size}
        if path.suffix != ".safetensors":
            files[path.name]["sha256"] = file_sha256(path)
    atomic_write_json(folder / MANIFEST, {"format": 1, "step": step, "files": files})


def verify_checkpoint(folder: Path) -> None:
    """Raise CheckpointError (one line: the file and the problem) unless every file the manifest lists is there
    with its size and digest. A checkpoint from before manifests only needs its trainer state."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: checkpoint folder is missing")
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if not (folder / TRAINER_STATE).is_file():
            raise CheckpointError(f"{folder / TRAINER_STATE} is missing (incomplete checkpoint)")
        return
    try:
        files = json.loads(manifest_path.read_text())["files"]
        entries = [(str(name), int(entry["bytes"]), entry.get("sha256")) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{manifest_path}: not a valid checkpoint manifest (corrupt)") from None
    if TRAINER_STATE not in {name for name, _, _ in entries}:
        raise CheckpointError(f"{manifest_path}: lists no {TRAINER_STATE} (corrupt manifest)")
    for name, size, digest in entries:
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (incomplete checkpoint)")
        actual = path.stat().st_size
        if actual != size:
            raise CheckpointError(f"{path}: {actual} bytes, the manifest says {size} (truncated or corrupt)")
        if digest is not None and file_sha256(path) != digest:
            raise CheckpointError(f"{path}: SHA-256 does not match the manifest (corrupt)")


def _candidates(root: Path) -> list[Path]:
    """Checkpoints to try, best first: the one `latest` names, then every step-* folder, newest first."""
    found = sorted((p for p in root.glob("step-*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    try:
        named = root / pointer.read_text().strip() if pointer.is_file() else None
    except (OSError, UnicodeDecodeError):
        named = None
    if named is not None and named.name.startswith("step-") and named.parent == root:
        found = [named] + [p for p in found if p != named]
    return found


def resume_checkpoint(out, load_model, strict: bool = False):
    """The newest checkpoint under OUT that verifies and loads: (folder, trainer state, load_model(folder)), or
    None when there is none at all. A bad one is reported in one warning line naming the file and the problem and
    the next older one is tried; `strict` raises CheckpointError instead. Every rank makes the same choice (they
    read the same files)."""
    root = checkpoints_dir(out)
    problems = []
    for folder in _candidates(root):
        try:
            verify_checkpoint(folder)
            state = load_trainer_state(folder)
            model = load_model(folder)
        except (CheckpointError, ModelError) as e:
            if strict:
                raise CheckpointError(f"{e}; --resume strict does not fall back to an older checkpoint") from None
            problems.append(str(e))
            logger.warning("resume: skipping checkpoint %s: %s", folder.name, e)
            continue
        if problems:
            logger.warning("resume: falling back to %s, the newest complete checkpoint", folder.name)
        return folder, state, model
    if problems:
        raise CheckpointError(f"{root}: no complete checkpoint to resume from ({len(problems)} checked; newest "
                              f"problem: {problems[0]})")
    return None


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
    """trainer_state.pt, read with weights_only=True (tensors and plain containers, no arbitrary pickle).
    Raises CheckpointError naming the file for anything unreadable."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing (incomplete checkpoint)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises RuntimeError, UnpicklingError, EOFError, ... on torn or foreign files
        reason = " ".join(str(e).split())[:120]
        raise CheckpointError(f"{path}: not a readable trainer state ({type(e).__name__}: {reason})") from None
    missing = [k for k in _STATE_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise CheckpointError(f"{path}: trainer state lacks {', '.join(missing)} (corrupt or foreign file)")
    return state


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

"""Reading what a run wrote: JSONL files (annotations, training logs), a model folder's weights, a training run's
latest checkpoint step, and comparisons of weight sets."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file


def read_jsonl(path) -> list[dict]:
    """Every non-blank line of a JSONL file, parsed."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def model_weights(folder) -> dict[str, torch.Tensor]:
    """name -> tensor of a model folder's model.safetensors."""
    return load_file(str(Path(folder) / "model.safetensors"))


def checkpoint_step(out) -> int:
    """The step of a training run's latest checkpoint (asserting the folder is named after it)."""
    from gmaivl_rt.train.checkpointing import latest_checkpoint, load_trainer_state

    checkpoint = latest_checkpoint(out)
    step = int(load_trainer_state(checkpoint)["step"])
    assert checkpoint.name == f"step-{step:08d}"
    return step


def split_weights(weights: dict, prefix: str) -> tuple[dict, dict]:
    """(the tensors under `prefix`, the rest)."""
    inside = {k: v for k, v in weights.items() if k.startswith(prefix)}
    return inside, {k: v for k, v in weights.items() if k not in inside}


def same_weights(a: dict, b: dict) -> bool:
    """The same names, each tensor bit for bit equal."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def all_moved(after: dict, before: dict, by: float) -> bool:
    """The same names, and every tensor moved by more than `by` (max absolute change)."""
    return after.keys() == before.keys() and all(float((after[k] - before[k]).abs().max()) > by for k in after)

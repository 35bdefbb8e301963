"""Vision pretraining, before the three stages: the vision tower (and projector) learn to see the findings.

GMAI-VL starts from a pretrained vision encoder (CLIP ViT-L/14-336); a model trained from random weights on this
machine has none. Trained only through the language model's answers, the compact ViT never learns the lesions: the
language model reads the image tokens at fixed places, the ViT gets gradient only there, and presence, count, side
and size stay at their blind level (docs/evaluation.md). Here the vision tower is first trained on its own, with
one linear head per label on the MEAN of its projected image tokens, so the findings become properties of the image
as a whole, which the language model reads as readily as the modality. Stage III then keeps the tower frozen.

    model = initial_model("train/configs/demo.yaml", "runs/demo/tokenizer")
    summary = pretrain_vision(model, pictures, labels, steps=800, batch_size=32, lr=1e-3)
    save_vision_model(model, "runs/demo/vision", tokenizer_dir="runs/demo/tokenizer", preset="compact",
                      summary=summary)           # stage I's --init

The data are tensors, so any labelled images serve (the demo's are generated scans with their labels,
`gmaivl_rt.data.synth.pictures`)."""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from gmaivl_rt.atomic import atomic_write_json, atomic_write_text
from gmaivl_rt.errors import InputError
from gmaivl_rt.model.modeling import IGNORE_INDEX

from .config import SAVED_CONFIG, load_train_config

IGNORE = IGNORE_INDEX  # a label that does not apply to a picture (the loss's own ignore index)
TRAINED = ("vision_tower", "multi_modal_projector")


def initial_model(config_file, tokenizer_dir, preset: str | None = None):
    """The model stage I builds when it has no --init: the config's preset with its `model` changes and the
    tokenizer's vocabulary, initialised under the config's `train.seed`. Returns (GMAIVL, merged stage-1 config)."""
    from gmaivl_rt.model.config import GMAIVLConfig
    from gmaivl_rt.model.modeling import GMAIVL
    from gmaivl_rt.runtime.tokenizer import load_tokenizer

    from .recipe import _preset_config

    cfg = load_train_config(1, preset, config_file)
    torch.manual_seed(cfg["train"]["seed"])
    return GMAIVL(_preset_config(GMAIVLConfig, cfg["preset"], load_tokenizer(tokenizer_dir), cfg.get("model"))), cfg


def pretrain_vision(model, pictures: torch.Tensor, labels: dict[str, torch.Tensor], *, steps: int, batch_size: int,
                    lr: float, warmup_ratio: float = 0.05, min_lr_ratio: float = 0.1, heldout: float = 0.1,
                    seed: int = 0, progress: bool = True) -> dict:
    """Train `model`'s vision tower and projector in place (the language model and its head are not touched).

    pictures: (N, 3, S, S) float32, CLIP-normalised at the model's image size; labels: {name: (N,) int64 class
    index, IGNORE where it does not apply}. AdamW, linear warm-up then cosine to min_lr_ratio. The last `heldout`
    share of the pictures is kept out of training and scored at the end. The model is left in eval mode with every
    parameter frozen (the heads are dropped: they read labels the language model is taught in words). Returns
    {"steps", "seconds", "losses", "heldout_accuracy": {name: accuracy}, "pictures"}."""
    from tqdm.auto import tqdm

    from .recipe import cosine_with_warmup

    count = pictures.shape[0]
    config = model.config
    size = config.vision.image_size
    if pictures.dim() != 4 or tuple(pictures.shape[1:]) != (3, size, size):
        raise InputError(f"vision pretraining pictures: expected (N, 3, {size}, {size}), got {tuple(pictures.shape)}")
    for name, column in labels.items():
        if column.shape != (count,):
            raise InputError(f"vision pretraining label {name!r}: expected ({count},) to match the pictures, got "
                             f"{tuple(column.shape)}")
    tokens = config.vision.tokens_per_image(size, size)
    train_count = count - max(1, round(heldout * count)) if heldout else count
    if train_count < 1 or steps < 1 or batch_size < 1:
        raise InputError(f"vision pretraining: {count} pictures ({train_count} to train on), {steps} steps, batch "
                         f"{batch_size}: each must be >= 1")

    generator = torch.Generator().manual_seed(seed)
    width = config.text.hidden_size
    classes = {name: int(column[column != IGNORE].max()) + 1 if (column != IGNORE).any() else 1
               for name, column in labels.items()}
    heads = torch.nn.ModuleDict({name: torch.nn.Linear(width, n) for name, n in classes.items()})
    for p in model.parameters():
        p.requires_grad_(False)
    params = [p for name in TRAINED for p in getattr(model, name).parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params + list(heads.parameters()), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(steps, round(warmup_ratio * steps), min_lr_ratio))

    def forward(index):
        """The mean projected image token (B, width) of pictures[index]."""
        return model.encode_images(pictures[index]).view(len(index), tokens, width).mean(1)

    def loss_of(index):
        pooled = forward(index)
        loss = pooled.new_zeros(())
        for name, column in labels.items():
            target = column[index]
            if (target != IGNORE).any():
                loss = loss + torch.nn.functional.cross_entropy(heads[name](pooled), target, ignore_index=IGNORE)
        return loss

    started, losses = time.perf_counter(), []
    model.train()
    for _ in tqdm(range(steps), desc="vision pretraining", unit="step", disable=not progress):
        index = torch.randint(0, train_count, (min(batch_size, train_count),), generator=generator)
        loss = loss_of(index)
        if not math.isfinite(loss.item()):
            raise InputError(f"vision pretraining: the loss became {float(loss)} at step {len(losses) + 1}; "
                             f"lower its lr ({lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    accuracy = {}
    if train_count < count:
        with torch.no_grad():
            index = torch.arange(train_count, count)
            pooled = forward(index)
            for name, column in labels.items():
                target, keep = column[index], column[index] != IGNORE
                if keep.any():
                    accuracy[name] = float((heads[name](pooled[keep]).argmax(-1) == target[keep]).float().mean())
    return {"steps": steps, "seconds": time.perf_counter() - started, "losses": losses,
            "heldout_accuracy": accuracy, "pictures": count}


def save_vision_model(model, out, *, tokenizer_dir, preset: str, summary: dict) -> Path:
    """A model folder stage I takes as --init: the weights, the tokenizer's files, `train_config.yaml` naming the
    preset (so stage I keeps the preset's config layer) and `vision_pretraining.json` (the summary, without the
    per-step losses, and the loss curve in `vision_losses.json`)."""
    import shutil

    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    atomic_write_text(out / SAVED_CONFIG, yaml.safe_dump({"preset": preset}, sort_keys=False))
    atomic_write_json(out / "vision_pretraining.json", {k: v for k, v in summary.items() if k != "losses"})
    atomic_write_json(out / "vision_losses.json", summary["losses"])
    return out

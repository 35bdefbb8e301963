"""One GMAI-VL training stage, top to bottom: config -> tokenizer -> model -> packed data -> AdamW + cosine ->
the loop (gradient accumulation over packs, clipping, logging, checkpoints) -> the stage's model folder.

    from gmaivl_rt.train.recipe import train
    train(stage=1, data="runs/data", out="runs/s1", preset="compact")
    train(stage=2, data="runs/data", out="runs/s2", init="runs/s1")

`OUT` ends up holding: the model (config.json + safetensors, `GMAIVL.from_pretrained(OUT)`), the tokenizer,
`generation_config.json` (GMAI-VL's recommended decoding, `gmaivl_rt.runtime.generation_config`), `train_config.yaml` (the merged config), `log.jsonl` (one line per optimizer step), `history.jsonl` (this and
earlier stages' steps), `loss.png`, and `checkpoints/` (see `checkpointing`).

Loss normalisation: a global batch's loss is the mean over all its predicted tokens, whichever rank and micro-step
they fall in (each pack's mean loss is weighted by its share of the batch's targets). Every rank knows every pack's
target count, so this needs no communication, and 1 rank and N ranks compute the same gradient.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import resource
import time
from pathlib import Path

import torch
import yaml

from gmaivl_rt.atomic import atomic_write_jsonl, atomic_write_text
from gmaivl_rt.errors import GmaivlError, InputError

from . import distributed as dist_utils
from .checkpointing import checkpoints_dir, restore, resume_checkpoint, save_checkpoint, write_model
from .config import RUN_KEY, SAVED_CONFIG, load_train_config, read_yaml, resume_config, run_inputs
from .dataset import ImagePolicy, PackedDataset
from gmaivl_rt.runtime.generation_config import write_generation_config
from gmaivl_rt.runtime.tokenizer import chat_stop_ids, check_tokenizer_fits, load_tokenizer, model_vocab_fields

from .tokenizer import conversation_texts, save_hf_tokenizer, train_bpe_tokenizer

logger = logging.getLogger(__name__)
NAN_POLICIES = ("stop", "skip")


class NonFiniteTrainingError(GmaivlError, ValueError):
    """A step's loss or gradient norm is NaN/Inf (train.nan_policy decides when this stops the run)."""


def train(stage: int, data, out, *, config=None, preset: str | None = None, init=None, tokenizer=None,
          max_steps: int | None = None, resume: bool | str = False, overrides: dict | None = None,
          progress: bool = True) -> dict:
    """Run one stage. data: data folder (meta.json) or meta-list; out: the stage's output folder; config: an extra
    YAML layer; preset: model preset when there is no `init`; init: the previous stage's output folder;
    tokenizer: a tokenizer folder (default: init's, else trained on `data`); max_steps: stop after this many
    optimizer steps (the schedule keeps its full length); resume: continue from OUT's newest complete checkpoint
    with the run's own config and inputs (OUT/train_config.yaml; stage and data may then be None, and arguments that
    contradict the saved run raise InputError); True: a corrupt newest checkpoint is reported and the one before it
    used; "strict": a corrupt one is an error. Without `init` the model is the preset with random weights (a
    warning says so). Works the same under torchrun. Returns a summary dict (steps, losses, final_loss, out)."""
    info = dist_utils.setup()
    try:
        return _train(stage, data, Path(out), config, preset, init, tokenizer, max_steps, resume, overrides or {},
                      progress, info)
    finally:
        dist_utils.teardown(info)


def _train(stage, data, out, config_file, preset, init, tokenizer_dir, max_steps, resume, overrides, progress,
           info) -> dict:
    from tqdm.auto import tqdm

    from gmaivl_rt.model.config import GMAIVLConfig
    from gmaivl_rt.model.modeling import GMAIVL

    if resume and (out / SAVED_CONFIG).is_file():
        # The run's own merged config and inputs, never a fresh merge from defaults; contradicting flags fail.
        cfg = resume_config(out, stage, preset, config_file, overrides, data=data, init=init, tokenizer=tokenizer_dir)
        run = cfg.get(RUN_KEY) or {}
        stage, data = int(cfg["stage"]), data if data is not None else run.get("data")
        init = init if init is not None else run.get("init")
        tokenizer_dir = tokenizer_dir if tokenizer_dir is not None else run.get("tokenizer")
        if data is None:
            raise InputError(f"--resume: {out / SAVED_CONFIG} does not record the data; give --data")
    else:
        if stage is None or data is None:
            raise InputError(f"train: give the stage and --data ({out / SAVED_CONFIG} is not there to resume from)")
        if preset is None and init is not None and (Path(init) / SAVED_CONFIG).is_file():
            # The previous stage's preset keeps its config layer (e.g. compact's max_length) for this stage too.
            preset = yaml.safe_load((Path(init) / SAVED_CONFIG).read_text()).get("preset")
        cfg = load_train_config(stage, preset, config_file, overrides)
        cfg[RUN_KEY] = run_inputs(data, init, tokenizer_dir)
        if init is None and info.is_main:
            chosen = "chosen" if preset or (config_file and read_yaml(config_file).get("preset")) or \
                overrides.get("preset") else "the default; --preset chooses another"
            logger.warning("stage %d starts from random weights: no --init, so the model is the %r preset (%s). "
                           "Pass --init MODEL_DIR to start from a trained model.", stage, cfg["preset"], chosen)
    out.mkdir(parents=True, exist_ok=True)
    if info.is_main:
        atomic_write_text(out / SAVED_CONFIG, yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(cfg["train"]["seed"])

    # ---- tokenizer and model
    tokenizer_dir = _resolve_tokenizer(tokenizer_dir, init, out, data, cfg, info)
    tokenizer = load_tokenizer(tokenizer_dir)
    found = resume_checkpoint(out, GMAIVL.from_pretrained, strict=resume == "strict") if resume else None
    checkpoint, state, model = found or (None, None, None)
    if resume and checkpoint is None and info.is_main:
        logger.warning("--resume: no checkpoint in %s yet; starting from the beginning", out)
    # GMAIVL.from_pretrained refuses weights that are non-finite or do not match their saved SHA-256 (ModelError),
    # so a silently corrupt --init or checkpoint never reaches step 1.
    if checkpoint is None:  # else the model is the checkpoint's, loaded (and verified) by resume_checkpoint
        model = GMAIVL.from_pretrained(init) if init is not None else \
            GMAIVL(_preset_config(GMAIVLConfig, cfg["preset"], tokenizer, cfg.get("model")))
    check_tokenizer_fits(model.config, tokenizer, tokenizer_dir)
    trainable = set_trainable(model, cfg["trainable"])
    model.set_gradient_checkpointing(bool(cfg["train"]["activation_checkpointing"]))
    model.to(info.device).train()
    model = dist_utils.wrap_model(model, info, cfg["distributed"])

    # ---- data
    cache_mb = cfg["data"].get("image_cache_mb")  # absent from runs saved before it existed: the policy's default
    images = ImagePolicy.from_model_config(dist_utils.unwrap(model).config,
                                           cache_bytes=None if cache_mb is None else int(float(cache_mb) * 2**20))
    dataset = PackedDataset(data, tokenizer, images,
                            max_length=int(cfg["data"]["max_length"]), seed=int(cfg["data"]["seed"]),
                            system=cfg["data"]["system"], open_packs=int(cfg["data"]["open_packs"]),
                            progress=progress and info.is_main)
    sampler = dist_utils.StepSampler(len(dataset), int(cfg["batch"]["global_batch_size"]), info.rank,
                                     info.world_size, int(cfg["data"]["seed"]))
    total_steps = cfg["schedule"]["total_steps"] or math.ceil(cfg["schedule"]["epochs"] * sampler.steps_per_epoch)
    end_step = min(total_steps, max_steps) if max_steps else total_steps

    # ---- optimizer and schedule
    opt = cfg["optimizer"]
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(lr_groups(dist_utils.unwrap(model), float(opt["lr"]), opt.get("lr_scale")),
                                  lr=float(opt["lr"]), betas=tuple(opt["betas"]), eps=float(opt["eps"]),
                                  weight_decay=float(opt["weight_decay"]),
                                  # one fused kernel on the CPU: 4.8 ms against 18 ms per step on the demo's 1.7M
                                  # parameters (foreach). CUDA keeps the default: fused with FSDP2's DTensor
                                  # parameters is not tested here (no GPU).
                                  fused=info.device.type == "cpu" or None)
    warmup = int(round(cfg["schedule"]["warmup_ratio"] * total_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, warmup, float(cfg["schedule"]["min_lr_ratio"])))
    start_step = 0
    counters = {"skipped_steps": 0, "nonfinite_in_row": 0}  # batches dropped for a non-finite loss / grad norm
    if checkpoint is not None:
        start_step = restore(state, model, optimizer, scheduler, info)
        counters.update({k: int(state["trainer"].get(k, 0)) for k in counters})
    log_path = out / "log.jsonl"
    log = _read_log(log_path)[:start_step] if checkpoint is not None else []
    if info.is_main:
        atomic_write_jsonl(log_path, log)
        logger.info("stage %d (%s): %s; %d trainable tensors; steps %d..%d of %d", stage, cfg.get("name"),
                    dataset.stats(), len(trainable), start_step, end_step, total_steps)

    # ---- the loop
    precision = cfg["train"]["precision"]
    use_bf16 = precision == "bf16" or (precision == "auto" and info.device.type == "cuda")
    grad_clip = float(cfg["train"]["grad_clip"])
    nan_policy, nan_max_skips = str(cfg["train"]["nan_policy"]), int(cfg["train"]["nan_max_skips"])
    if nan_policy not in NAN_POLICIES:
        raise ValueError(f"train.nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
    # This rank's packs for every remaining step, in order; workers (data.num_workers) decode images ahead.
    loader = iter(torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=[i for s in range(start_step, end_step) for i in sampler.rank_batch(s)],
        num_workers=int(cfg["data"]["num_workers"]), pin_memory=info.device.type == "cuda"))
    bar = tqdm(total=end_step, initial=start_step, desc=f"stage {stage}", unit="step",
               disable=not (progress and info.is_main))
    for step in range(start_step, end_step):
        started = time.perf_counter()
        global_packs = sampler.global_batch(step)
        global_targets = sum(dataset.num_targets(i) for i in global_packs)
        local_packs = global_packs[info.rank::info.world_size]
        loss_share, tokens = 0.0, 0
        for k, index in enumerate(local_packs):
            batch = _to_device(next(loader), info.device)
            weight = dataset.num_targets(index) / global_targets
            with _no_grad_sync(model, last=k == len(local_packs) - 1):
                with torch.autocast(info.device.type, dtype=torch.bfloat16, enabled=use_bf16):
                    output = model(batch["input_ids"], pixel_values=batch["pixel_values"],
                                   position_ids=batch["position_ids"], labels=batch["labels"],
                                   cu_seqlens=batch["cu_seqlens"])
                # DDP/FSDP average gradients over ranks: scale by world_size so the result is the global mean.
                (output.loss * weight * info.world_size).backward()
            loss_share += float(output.loss.detach()) * weight
            tokens += dataset.num_tokens(index)
        grad_norm = _grad_norm(torch.nn.utils.clip_grad_norm_(params, grad_clip))
        lr = scheduler.get_last_lr()[0] / optimizer.param_groups[0]["lr_scale"]  # the base lr, as configured
        # Every rank sees the same global loss and grad norm, so every rank takes the same branch below.
        loss = dist_utils.all_reduce_sum(loss_share, info)
        tokens = dist_utils.all_reduce_sum(float(tokens), info)
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            optimizer.step()
            counters["nonfinite_in_row"] = 0
        else:  # the batch is dropped: no optimizer step, and the weights stay those of the last good step
            counters["skipped_steps"] += 1
            counters["nonfinite_in_row"] += 1
        stop = not finite and (nan_policy == "stop" or counters["nonfinite_in_row"] >= nan_max_skips)
        stop_reason = _nonfinite_message(step + 1, loss, grad_norm, model, nan_policy, counters["nonfinite_in_row"],
                                         out) if stop else None  # before zero_grad: it names the bad gradients
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - started
        record = {"stage": stage, "step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                  "tokens": int(tokens), "tokens_per_s": tokens / seconds, "peak_mem_mb": _peak_memory_mb(info),
                  "ranks": info.world_size}
        if not finite:
            record["skipped"] = True
        record = strict_json_record(record)
        log.append(record)
        if info.is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record, allow_nan=False) + "\n")
        if stop:
            bar.close()
            raise NonFiniteTrainingError(stop_reason)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if (step + 1) % int(cfg["train"]["save_every"]) == 0 or step + 1 == end_step:
            save_checkpoint(out, step + 1, model, optimizer, scheduler,
                            {"stage": stage, "total_steps": total_steps, **counters},
                            info, keep_last=int(cfg["train"]["keep_last"]))
    bar.close()

    # ---- the stage's model folder, loss history and plot
    write_model(model, out, info)
    if info.is_main:
        if Path(tokenizer_dir).resolve() != out.resolve():
            save_hf_tokenizer(tokenizer, out)
        text = dist_utils.unwrap(model).config.text
        write_generation_config(out, token_ids={"bos_token_id": text.bos_token_id, "eos_token_id": text.eos_token_id,
                                                "pad_token_id": text.pad_token_id})
        history = _read_log(Path(init) / "history.jsonl") if init is not None else []
        history = [r for r in history if r.get("stage") != stage] + log
        atomic_write_jsonl(out / "history.jsonl", history)
        from .plots import plot_loss_curves

        plot_loss_curves(history, out / "loss.png")
    dist_utils.barrier(info)
    return {"out": str(out), "stage": stage, "steps": end_step, "total_steps": total_steps,
            "losses": [r["loss"] for r in log], "final_loss": log[-1]["loss"] if log else None,
            "skipped_steps": counters["skipped_steps"], "data": dataset.stats()}


# ------------------------------------------------------------------------------------------------------ helpers
def cosine_with_warmup(total_steps: int, warmup_steps: int, min_lr_ratio: float):
    """LR multiplier for step s: linear warm-up to 1 over `warmup_steps`, then cosine down to `min_lr_ratio`."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def set_trainable(model: torch.nn.Module, prefixes: list[str]) -> list[str]:
    """requires_grad on exactly the parameters under `prefixes` (module paths); returns their names."""
    names = []
    for name, param in model.named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + ".") for p in prefixes))
        if param.requires_grad:
            names.append(name)
    if not names:
        raise ValueError(f"trainable prefixes {prefixes} match no parameter of the model")
    return names


def lr_groups(model: torch.nn.Module, lr: float, scale: dict | None) -> list[dict]:
    """AdamW parameter groups over the trainable parameters: those under a module path in `scale` ({prefix: factor},
    the optimizer's `lr_scale`) learn at lr * factor, the rest at lr. The schedule scales every group alike."""
    scale = {str(k): float(v) for k, v in (scale or {}).items()}
    groups: dict[float, list] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            factor = next((f for prefix, f in scale.items() if name == prefix or name.startswith(prefix + ".")), 1.0)
            groups.setdefault(factor, []).append(param)
    return [{"params": params, "lr": lr * factor, "lr_scale": factor} for factor, params in groups.items()]


def _preset_config(config_cls, preset: str, tokenizer, model: dict | None = None):
    """The preset's dimensions, changed by the config's `model` block ({"vision": {...}, "text": {...}}: field
    changes, as `GMAIVLConfig.replace` takes them), with the vocabulary, `<image>` id and special ids our tokenizer
    decides."""
    fields = model_vocab_fields(tokenizer)
    eos = chat_stop_ids(tokenizer)
    return config_cls.preset(preset).replace(**(model or {})).replace(
        image_token_index=fields["image_token_index"],
        text={"vocab_size": fields["text"]["vocab_size"], "bos_token_id": tokenizer.bos_token_id,
              "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id})


def _resolve_tokenizer(explicit, init, out: Path, data, cfg, info) -> Path:
    """--tokenizer, else the init folder's, else one already in OUT (a rerun), else train one on the data."""
    if explicit is not None:
        return Path(explicit)
    if init is not None and (Path(init) / "tokenizer.json").is_file():
        return Path(init)
    if not (out / "tokenizer.json").is_file() and info.is_main:
        logger.info("training a %d-token byte-level BPE on %s", cfg["tokenizer"]["vocab_size"], data)
        train_bpe_tokenizer(conversation_texts(data), out, vocab_size=int(cfg["tokenizer"]["vocab_size"]),
                            min_frequency=int(cfg["tokenizer"]["min_frequency"]))
    dist_utils.barrier(info)
    return out


def _to_device(batch: dict, device) -> dict:
    moved = {}
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            moved[key] = value.to(device, non_blocking=True)
        elif isinstance(value, list):
            moved[key] = [v.to(device, non_blocking=True) for v in value]
        else:
            moved[key] = value
    return moved


def _no_grad_sync(model, last: bool):
    """Skip the gradient all-reduce on all but the last micro-step of an accumulation (DDP and FSDP2)."""
    if last:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return no_sync()
    return contextlib.nullcontext()


def _grad_norm(norm) -> float:
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor
        norm = norm.full_tensor()
    return float(norm)


def _peak_memory_mb(info) -> float:
    if info.device.type == "cuda":
        return torch.cuda.max_memory_allocated(info.device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB: process peak RSS


def strict_json_record(record: dict) -> dict:
    """The log record with NaN/Inf floats as null and their keys listed under "nonfinite" (strict JSON)."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: (None if k in bad else v) for k, v in record.items()}, "nonfinite": bad}


def _nonfinite_message(step: int, loss: float, grad_norm: float, model, policy: str, in_row: int, out) -> str:
    bad = []
    for name, p in dist_utils.unwrap(model).named_parameters():
        grad = getattr(p.grad, "to_local", lambda: p.grad)() if p.grad is not None else None
        if (grad is not None and not bool(torch.isfinite(grad).all())) or \
                not bool(torch.isfinite(getattr(p, "to_local", lambda: p)().detach()).all()):
            bad.append(name)
    where = f"non-finite gradients or weights in {len(bad)} parameter(s), e.g. {', '.join(bad[:3])}" if bad \
        else "no parameter is non-finite (the loss itself is)"
    why = "train.nan_policy is stop" if policy == "stop" else f"{in_row} non-finite steps in a row (nan_max_skips)"
    return (f"step {step}: loss {loss}, grad norm {grad_norm}; {where}. Stopped before the optimizer step "
            f"({why}); the last good checkpoint in {checkpoints_dir(out)} stays 'latest'")


def _read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


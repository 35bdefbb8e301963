"""Training configuration: YAML files merged in layers, every number in a file, none in the code.

Layers, later wins: `configs/common.yaml` -> `configs/stage{N}.yaml` -> `configs/presets/<preset>.yaml` ->
the user's `--config FILE` -> `overrides` (a dict, from Python). In any layer a `stages: {N: {...}}` block
applies only to stage N (e.g. the demo's per-stage step counts).
"""
from __future__ import annotations

import copy
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
STAGES = (1, 2, 3)


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of `base` with `update` merged in, recursing into nested dicts."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"training config: no file {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"training config {path}: the top level must be a mapping")
    return data


def _apply_layer(config: dict, layer: dict, stage: int) -> dict:
    per_stage = layer.get("stages") or {}
    layer = {k: v for k, v in layer.items() if k != "stages"}
    config = deep_merge(config, layer)
    return deep_merge(config, per_stage.get(stage) or per_stage.get(str(stage)) or {})


def load_train_config(stage: int, preset: str | None = None, config_file=None, overrides: dict | None = None) -> dict:
    """The merged config for one stage. `preset` None keeps the layers' `preset` key (common.yaml: tiny)."""
    if stage not in STAGES:
        raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
    config = {}
    user_layers = [read_yaml(config_file)] if config_file else []
    user_layers += [overrides or {}]
    for layer in [read_yaml(CONFIG_DIR / "common.yaml"), read_yaml(CONFIG_DIR / f"stage{stage}.yaml")]:
        config = _apply_layer(config, layer, stage)
    # The preset can come from the user layers, so peek at them before adding the preset's own file.
    chosen = preset
    for layer in user_layers:
        chosen = chosen or _apply_layer({}, layer, stage).get("preset")
    config["preset"] = chosen or config["preset"]
    preset_file = CONFIG_DIR / "presets" / f"{config['preset']}.yaml"
    if preset_file.is_file():
        config = _apply_layer(config, read_yaml(preset_file), stage)
    for layer in user_layers:
        config = _apply_layer(config, layer, stage)
    if preset:
        config["preset"] = preset
    config["stage"] = stage
    _validate(config)
    return config


def _validate(config: dict) -> None:
    problems = []
    if not config.get("trainable"):
        problems.append("'trainable' lists no parameter prefixes")
    if float(config["optimizer"].get("lr", 0)) <= 0:
        problems.append("optimizer.lr must be positive")
    scale = config["optimizer"].get("lr_scale") or {}
    if not isinstance(scale, dict) or any(not isinstance(v, (int, float)) or v <= 0 for v in scale.values()):
        problems.append("optimizer.lr_scale must map module paths to positive numbers")
    if int(config["batch"]["global_batch_size"]) < 1:
        problems.append("batch.global_batch_size must be >= 1")
    if int(config["data"]["max_length"]) < 2:
        problems.append("data.max_length must be >= 2")
    if float(config["data"].get("image_cache_mb", 0)) < 0:
        problems.append("data.image_cache_mb must be >= 0 (0: no cache)")
    if config["train"]["precision"] not in ("auto", "fp32", "bf16"):
        problems.append(f"train.precision {config['train']['precision']!r} is not auto, fp32 or bf16")
    if config["distributed"]["strategy"] not in ("ddp", "fsdp"):
        problems.append(f"distributed.strategy {config['distributed']['strategy']!r} is not ddp or fsdp")
    if problems:
        raise ValueError(f"training config (stage {config.get('stage')}): " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------------ resume
SAVED_CONFIG = "train_config.yaml"  # OUT/train_config.yaml: the run's merged config plus its `run` block
RUN_KEY = "run"                     # the run's own inputs: data, init, tokenizer (absolute paths or null)
RUN_FLAGS = {"data": "--data", "init": "--init", "tokenizer": "--tokenizer"}


def run_inputs(data, init, tokenizer) -> dict:
    """The `run` block saved beside the merged config: the paths that decide the run's model and packs."""
    return {key: (str(Path(value).resolve()) if value is not None else None)
            for key, value in (("data", data), ("init", init), ("tokenizer", tokenizer))}


def resume_config(out, stage: int | None = None, preset: str | None = None, config_file=None,
                  overrides: dict | None = None, **inputs) -> dict:
    """`--resume`: the run's own merged config from OUT/train_config.yaml (with its `run` block), never one merged
    anew from defaults. Flags left out are taken from it; flags given must agree with it: stage, preset, the
    settings a `--config` file or `overrides` would produce, and the `inputs` data / init / tokenizer paths.
    Raises InputError naming every flag that contradicts the saved run."""
    from gmaivl_rt.errors import InputError

    path = Path(out) / SAVED_CONFIG
    saved = read_yaml(path)
    run = saved.get(RUN_KEY) or {}
    problems = []
    if stage is not None and int(stage) != int(saved["stage"]):
        problems.append(f"--stage {stage} (the run is stage {saved['stage']})")
    if preset is not None and preset != saved.get("preset"):
        problems.append(f"--preset {preset} (the run uses {saved.get('preset')})")
    if config_file is not None or overrides:
        wanted = load_train_config(int(saved["stage"]), preset or saved.get("preset"), config_file, overrides)
        mine = {k: v for k, v in saved.items() if k != RUN_KEY}
        changed = [key for key in sorted(set(_flatten(wanted)) | set(_flatten(mine)))
                   if _flatten(wanted).get(key) != _flatten(mine).get(key)]
        if changed:
            shown = ", ".join(f"{k} ({_flatten(mine).get(k)!r} -> {_flatten(wanted).get(k)!r})" for k in changed[:8])
            more = f" and {len(changed) - 8} more" if len(changed) > 8 else ""
            problems.append(f"{'--config ' + str(config_file) if config_file else 'overrides'} changes {shown}{more}")
    given = run_inputs(**{k: inputs.get(k) for k in RUN_FLAGS})
    for key, flag in RUN_FLAGS.items():
        if given[key] is not None and run.get(key) is not None and given[key] != run[key]:
            problems.append(f"{flag} {inputs[key]} (the run used {run[key]})")
        elif given[key] is not None and key in run and run[key] is None:
            problems.append(f"{flag} {inputs[key]} (the run had none)")
    if problems:
        raise InputError(f"--resume: {path} holds this run's settings and these flags contradict them: "
                         + "; ".join(problems) + ". Leave them out to continue the run as it was, or train into a "
                         "new --out.")
    return saved


def _flatten(tree: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat

"""Decoding defaults: the one place that decides what a request which leaves a decoding option out gets.

The source is a model folder's `generation_config.json`, the file transformers' `GenerationConfig.from_pretrained`
and vLLM's `--generation-config auto` read, with transformers' field names. `resolve_generation_config` reads it for
`load()`, so `ask`, the engine, the server and `eval` all see the same defaults (`Backend.generation_defaults`):

- "auto": the folder's generation_config.json when it has one, else plain greedy (`PLAIN_GREEDY`);
- "none": plain greedy, whatever the folder holds;
- a path: that generation_config.json, or a folder holding one (as vLLM's `--generation-config DIR`).

Fields read (`DECODING_FIELDS`): do_sample, temperature, top_p, top_k, repetition_penalty, no_repeat_ngram_size,
max_new_tokens; a field the file leaves out (or sets to null) keeps its plain-greedy value, other fields (token ids,
transformers_version, ...) are left to the tools that use them. The trainer and the ONNX export write GMAI-VL's
recommended settings (`RECOMMENDED_GENERATION`) with `write_generation_config`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gmaivl_rt.errors import GmaivlError, ModelError
from gmaivl_rt.model.sampling import SamplingParams

GENERATION_CONFIG = "generation_config.json"
DECODING_FIELDS = ("max_new_tokens", "do_sample", "temperature", "top_p", "top_k", "repetition_penalty",
                   "no_repeat_ngram_size")
# No file: greedy with nothing added (no penalty, no n-gram ban, top_p 1, top_k off), as an OpenAI / vLLM request
# with temperature 0 means it. max_new_tokens 128 is the runtime's own answer length.
PLAIN_GREEDY = {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 0,
                "repetition_penalty": 1.0, "no_repeat_ngram_size": 0}
# GMAI-VL's recommended settings, which the trainer and the export write into a model's generation_config.json:
# its demo's penalties and top_p; greedy unless do_sample (then GMAI-VL's demo sampling, top_p 0.9), so answers are
# reproducible.
RECOMMENDED_GENERATION = {"max_new_tokens": 128, "do_sample": False, "temperature": 1.0, "top_p": 0.9, "top_k": 0,
                          "repetition_penalty": 1.12, "no_repeat_ngram_size": 5}


@dataclass(frozen=True)
class GenerationDefaults:
    """options: every field of DECODING_FIELDS (what a request that leaves one out gets); origin: where they came
    from, for run.json and the server's start-up line (a file path, or why plain greedy)."""
    options: dict
    origin: str


def resolve_generation_config(source="auto", model_dir=None) -> GenerationDefaults:
    """source: "auto" | "none" | a path (a generation_config.json file or a folder holding one); model_dir: the
    model folder "auto" looks in. ModelError naming the file when it is unreadable, not a JSON object, or holds a
    decoding field of the wrong type or range; FileNotFoundError for a path that does not exist."""
    if source is None or source == "none":
        return GenerationDefaults(dict(PLAIN_GREEDY), "none: plain greedy")
    if source == "auto":
        if model_dir is None or not (Path(model_dir) / GENERATION_CONFIG).is_file():
            return GenerationDefaults(dict(PLAIN_GREEDY), f"auto: no {GENERATION_CONFIG} in the model folder, "
                                                          "plain greedy")
        path = Path(model_dir) / GENERATION_CONFIG
    else:
        path = Path(source)
        if path.is_dir():
            path = path / GENERATION_CONFIG
        if not path.is_file():
            raise FileNotFoundError(f"generation config {str(path)!r} does not exist (give auto, none, a "
                                    f"{GENERATION_CONFIG} file or a folder holding one)")
    return GenerationDefaults(read_generation_config(path), str(path.resolve()))


def read_generation_config(path) -> dict:
    """A generation_config.json -> PLAIN_GREEDY with the file's decoding fields over it, each checked by the
    sampler's own rules (`SamplingParams`; max_new_tokens an int >= 1)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path}: must hold a JSON object of generation fields")
    options = dict(PLAIN_GREEDY)
    options.update({k: data[k] for k in DECODING_FIELDS if data.get(k) is not None})
    _check_decoding(options, str(path))
    return options


def _check_decoding(options: dict, where: str) -> None:
    max_new_tokens = options["max_new_tokens"]
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ModelError(f"{where}: max_new_tokens must be an int >= 1, got {str(max_new_tokens)[:20]}")
    try:
        SamplingParams(**{k: options[k] for k in DECODING_FIELDS if k != "max_new_tokens"})
    except GmaivlError as e:
        raise ModelError(f"{where}: {e}") from None


def write_generation_config(folder, options: dict | None = None, *, token_ids: dict | None = None) -> Path:
    """Write `folder`/generation_config.json (atomically): `options` (default RECOMMENDED_GENERATION; every field
    of DECODING_FIELDS, checked as a reader will check them) and `token_ids` (bos_token_id / eos_token_id /
    pad_token_id for the tools that read them there; None values left out). Returns the path."""
    from gmaivl_rt.atomic import atomic_write_json

    options = dict(RECOMMENDED_GENERATION if options is None else options)
    missing = [k for k in DECODING_FIELDS if k not in options]
    if missing:
        raise ValueError(f"write_generation_config: options lack {', '.join(missing)}")
    path = Path(folder) / GENERATION_CONFIG
    _check_decoding(options, str(path))  # nothing is written that a reader would refuse
    body = {k: options[k] for k in DECODING_FIELDS}
    body.update({k: v for k, v in (token_ids or {}).items() if v is not None})
    atomic_write_json(path, body)
    return path

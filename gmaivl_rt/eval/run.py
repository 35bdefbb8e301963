"""`evaluate`: a model answers a benchmark in batches, each answer appended to predictions.jsonl as it comes (so a
killed run resumes), then scored. `score`: the same scoring over a saved predictions file, no model needed.

Generation goes through the runtime (`gmaivl_rt.load(...)`): its `build_request` (limits, image reading, chat
template, preprocessing, generation options), `generate` (the shared decoding loop) and `decode`. `_answer_batch`
is the one place that talks to it."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gmaivl_rt.atomic import atomic_write_json, file_sha256
from gmaivl_rt.errors import InputError
from gmaivl_rt.eval.prompts import decoding_for, item_prompt, item_text
from gmaivl_rt.eval.readers import Base64Image, read_benchmark
from gmaivl_rt.eval.report import aggregate, write_report
from gmaivl_rt.eval.scoring import score_prediction
from gmaivl_rt.runtime.batching import left_padded_batch, pixel_batch

PREDICTIONS = "predictions.jsonl"


# ------------------------------------------------------------------------------------------------ model side
def _image_input(ref):
    """An item's image reference -> what `runtime.build_request` reads (through
    `gmaivl_rt.medical.convert.to_medical_image`): a file path, or the decoded bytes of a base64 TSV image."""
    if isinstance(ref, Base64Image):
        import base64
        import binascii

        try:
            return base64.b64decode(ref.data, validate=False)
        except (binascii.Error, ValueError):
            raise InputError("a benchmark image (TSV `image` column) is not valid base64") from None
    return ref


def _answer_batch(runtime, questions: list[str], images: list[list], decoding: dict) -> list[str]:
    """One batch through the runtime: each question (literal text; the chat template puts one image slot per image
    before it) and its images checked and prepared by `runtime.build_request`, left-padded into one batch
    (`gmaivl_rt.runtime.batching`), generated with `decoding`, decoded. Returns the stripped answer texts, in
    order."""
    requests = [runtime.build_request(q, images=list(imgs), **decoding) for q, imgs in zip(questions, images)]
    generation = requests[0].generation  # the same options for every item: eos / pad ids, decoding
    ids, mask = left_padded_batch([request.input_ids[0] for request in requests], generation["pad_token_id"])
    width = ids.shape[1]
    # images in row order = image tokens in row-major order
    pixel_values = pixel_batch([p for request in requests if request.pixel_values is not None
                                for p in request.pixel_values], runtime.config.vision.dynamic_resolution)
    out = runtime.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **generation)
    return [text.strip() for text in runtime.decode(out[:, width:])]


# ------------------------------------------------------------------------------------------------ predictions file
def read_predictions(path, repair: bool = False) -> dict[str, dict]:
    """predictions.jsonl -> {index: line}. A torn last line (a run killed mid-write) is dropped, and with
    `repair` cut from the file so appending continues cleanly; any other bad line is an error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"predictions file {str(path)!r} does not exist")
    data = path.read_bytes()
    complete = data[:data.rfind(b"\n") + 1]
    if repair and len(complete) != len(data):
        with open(path, "r+b") as f:
            f.truncate(len(complete))
            os.fsync(f.fileno())
    found = {}
    for number, line in enumerate(complete.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"predictions file {path.name!r}, line {number}: not valid JSON") from None
        if not isinstance(row, dict) or "index" not in row or "prediction" not in row:
            raise InputError(f"predictions file {path.name!r}, line {number}: needs `index` and `prediction`")
        found[str(row["index"])] = row
    return found


def _append_line(handle, row: dict) -> None:
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _scored_row(item, prediction: str) -> tuple[dict, dict]:
    """(the predictions.jsonl fields of one scored item, the row `report.aggregate` takes)."""
    result = score_prediction(item, prediction)
    line = {"index": item.index, "prediction": prediction, "extracted": result["extracted"],
            "answer": item.answer, "correct": result["correct"], **item.groups}
    line.update({k: result[k] for k in ("recall", "f1", "exact_match") if k in result})
    row = {"kind": item.kind, "correct": result["correct"], "parsed": result["parsed"],
           "n_options": max(1, len(item.scoring_options or item.options)), "groups": item.groups,
           **{k: result[k] for k in ("recall", "f1", "exact_match") if k in result}}
    return line, row


# ------------------------------------------------------------------------------------------------ API
def evaluate(model_dir, data, out, *, format: str = "auto", protocol: str | None = None, backend: str = "torch",
             batch_size: int = 8, limit: int | None = None, resume: bool = False, progress: bool = True,
             generation_config="auto", **backend_kwargs) -> dict:
    """Answer every question of the benchmark file `data` with the model in `model_dir` and score the answers.
    Writes into `out`: predictions.jsonl (appended as it goes), scores.json, scores_by_<column>.csv, scores.png
    and run.json. resume: continue an interrupted run in `out` (same data file, same decoding).
    generation_config: the decoding defaults `gmaivl_rt.load` resolves ("auto", "none" or a path); the protocol's
    decoding (`prompts.DECODING`) goes over them, and run.json records every decoding option used and where the
    defaults came from. Returns scores.json's dict."""
    import gmaivl_rt

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    bench = read_benchmark(data, format, protocol)
    items = bench.items[:limit] if limit else bench.items
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    predictions_path = out / PREDICTIONS
    data_sha256 = file_sha256(bench.path)
    previous = {}
    if predictions_path.exists():  # checked before the model loads: a wrong --out fails at once
        if not resume:
            raise InputError(f"{predictions_path} already exists: pass --resume to continue that run, or choose "
                             "another --out")
        previous = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        if previous.get("data_sha256") not in (None, data_sha256):
            raise InputError("--resume: the benchmark file differs from the one this run started on")
    runtime = gmaivl_rt.load(model_dir, backend=backend, generation_config=generation_config, **backend_kwargs)
    # every option the answers are generated with: the model's defaults, the protocol's decoding over them
    decoding = {**runtime.generation_defaults, **decoding_for(bench.protocol)}
    done = {}
    if predictions_path.exists():
        started_with = previous.get("decoding") or {}
        if any(decoding.get(k) != v for k, v in started_with.items()):
            raise InputError("--resume: the decoding differs from the one this run started with (see run.json's "
                             "decoding and --generation-config)")
        done = read_predictions(predictions_path, repair=True)
    run_info = {"model": str(Path(model_dir).resolve()), "backend": backend, "placement": runtime.placement,
                "data": str(bench.path.resolve()),
                "data_sha256": data_sha256, "format": bench.format, "protocol": bench.protocol,
                "prompts": _prompt_description(bench.protocol), "decoding": decoding,
                "generation_config": runtime.generation.origin, "batch_size": batch_size,
                "limit": limit, "items": len(items), "scoring": _scoring_description(items)}
    atomic_write_json(out / "run.json", {**run_info, "status": "running"})

    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(total=len(items), initial=sum(i.index in done for i in items), unit="item", desc="eval",
               disable=not progress)
    # Batches are fixed slices of the item list, and a slice with any item left is generated whole: a resumed run
    # feeds the model the same batches (same padding) as an uninterrupted one.
    with open(predictions_path, "a", encoding="utf-8") as handle:
        for start in range(0, len(items), batch_size):
            batch = items[start:start + batch_size]
            if all(item.index in done for item in batch):
                continue
            try:
                answers = _answer_batch(runtime, [item_text(i) for i in batch],
                                        [[_image_input(ref) for ref in i.images] for i in batch], decoding)
            except InputError as error:  # name the benchmark rows: the runtime names only "image 1", "question"
                raise type(error)(f"benchmark items {batch[0].index}..{batch[-1].index}: {error}") from None
            for item, answer in zip(batch, answers):
                if item.index in done:
                    continue
                line, _ = _scored_row(item, answer)
                _append_line(handle, {"index": item.index, "prompt": item_prompt(item), **line})
                done[item.index] = line
                bar.update(1)
    bar.close()
    scores = _score_items(items, {i.index: done[i.index]["prediction"] for i in items}, out)
    atomic_write_json(out / "run.json", {**run_info, "status": "done", "seconds": time.perf_counter() - started,
                                         "unparsed": scores["unparsed"]})
    return scores


def score(predictions, data, out, *, format: str = "auto", protocol: str | None = None) -> dict:
    """Rescore a predictions file (lines with `index` and `prediction`) against the benchmark file `data`, without
    a model: scores.json, the per-group CSVs and scores.png in `out`. Returns scores.json's dict."""
    bench = read_benchmark(data, format, protocol)
    found = read_predictions(predictions)
    by_index = {item.index: item for item in bench.items}
    unknown = [i for i in found if i not in by_index]
    if unknown:
        raise InputError(f"predictions file: {len(unknown)} index(es) not in the benchmark file, e.g. "
                         f"{unknown[0][:20]!r}")
    items = [item for item in bench.items if item.index in found]
    return _score_items(items, {i: found[i]["prediction"] for i in found}, Path(out))


def _score_items(items, predictions: dict[str, str], out: Path) -> dict:
    rows = [_scored_row(item, predictions[item.index])[1] for item in items]
    scores = aggregate(rows, "mcq" if items and items[0].kind == "mcq" else "closed-open")
    write_report(out, scores, rows)
    return scores


def _prompt_description(protocol: str) -> dict:
    from gmaivl_rt.eval import prompts

    if protocol == "mcq":
        return {"template": "<image>\\n{hint}\\n{question}\\nA. {A}\\nB. {B}...\\n" + prompts.MCQ_INSTRUCTION,
                "instruction_zh": prompts.MCQ_INSTRUCTION_ZH, "source": "VLMEvalKit LLaVA-XTuner build_prompt"}
    return {"template": "<image>\\n{question}\\n" + prompts.CLOSED_OPEN_INSTRUCTION, "source": "lmms-eval"}


def _scoring_description(items) -> str:
    scorers = {item.scorer for item in items}
    names = {"vlmevalkit": "VLMEvalKit can_infer (exact_matching, unparsed -> Z = wrong)",
             "huatuo": "HuatuoGPT-Vision match_choice3",
             "closed-open": "closed: yes/no must match exactly one; open: LLaVA-Med token recall/F1, exact match"}
    return "; ".join(names[s] for s in sorted(scorers))

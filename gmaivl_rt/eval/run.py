"""`evaluate`: a model answers a benchmark in batches, each answer appended to predictions.jsonl as it comes (so a
killed run resumes), then scored. `score`: the same scoring over a saved predictions file, no model needed, writing
the same per-item verdicts. `merge`: the shards of `evaluate(..., shard=(i, n))` joined into the unsharded run.
`compare`: two runs' per-group differences with paired intervals and the items whose verdict changed.

Generation goes through the runtime (`gmaivl_rt.load(...)`): its `build_request` (limits, image reading, chat
template, preprocessing, generation options), `generate` (the shared decoding loop) and `decode`. `_answer_batch`
is the one place that talks to it."""
from __future__ import annotations

import hashlib
import json
import os
import stat
import time
import warnings
from pathlib import Path

from gmaivl_rt.atomic import atomic_write_json, atomic_write_text, file_sha256
from gmaivl_rt.errors import InputError
from gmaivl_rt.eval.prompts import decoding_for, item_prompt, item_text
from gmaivl_rt.eval.readers import Base64Image, read_benchmark
from gmaivl_rt.eval.report import aggregate, paired_bootstrap_ci, write_report
from gmaivl_rt.eval.scoring import CLOSED_OPEN_SCORERS, DEFAULT_CLOSED_OPEN_SCORER, score_prediction
from gmaivl_rt.runtime.batching import left_padded_batch, pixel_batch

PREDICTIONS = "predictions.jsonl"
CONSTRAINED_NOTE = ("constrained decoding (--constrained): multiple-choice answers under choice = the option letters, "
                    "yes/no questions under choice = yes/no; not comparable with the kits' unconstrained numbers")


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


def item_constraint(item) -> dict:
    """`--constrained` decoding (issue 26): a multiple-choice item answers under `choice` = its option letters, a
    closed item whose gold answer is yes or no under `choice` = ["yes", "no"]; anything else is unconstrained ({})."""
    if item.kind == "mcq" and item.options:
        return {"choice": list(item.options)}
    if item.kind == "closed" and isinstance(item.answer, str) and item.answer.strip().lower() in ("yes", "no"):
        return {"choice": ["yes", "no"]}
    return {}


def _answer_batch(runtime, questions: list[str], images: list[list], decoding: dict,
                  constraints: list[dict] | None = None) -> list[str]:
    """One batch through the runtime: each question (literal text; the chat template puts one image slot per image
    before it) and its images checked and prepared by `runtime.build_request`, left-padded into one batch
    (`gmaivl_rt.runtime.batching`), generated with `decoding` (and each row's own constraint, `constraints`: one
    `item_constraint` per question), decoded. Returns the stripped answer texts, in order."""
    constraints = constraints or [{}] * len(questions)
    requests = [runtime.build_request(q, images=list(imgs), **decoding, **c)
                for q, imgs, c in zip(questions, images, constraints)]
    generation = dict(requests[0].generation)  # the same options for every item: eos / pad ids, decoding
    if any(constraints):  # one constraint per row (None: free), each row masked by its own
        generation["constraint"] = [r.generation.get("constraint") for r in requests]
    ids, mask = left_padded_batch([request.input_ids[0] for request in requests], generation["pad_token_id"])
    width = ids.shape[1]
    # images in row order = image tokens in row-major order
    pixel_values = pixel_batch([p for request in requests if request.pixel_values is not None
                                for p in request.pixel_values], runtime.config.vision.dynamic_resolution)
    out = runtime.generate(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, **generation)
    return [text.strip() for text in runtime.decode(out[:, width:])]


# ------------------------------------------------------------------------------------------------ predictions file
# the fields of a predictions.jsonl line that are not grouping values
LINE_FIELDS = ("index", "prompt", "prediction", "extracted", "answer", "correct", "score", "split", "cluster",
               "g_index", "circular_correct", "recall", "precision", "f1", "exact_match")


PREDICTION_TABLES = (".xlsx", ".tsv", ".csv")  # VLMEvalKit's own prediction files ({model}_{dataset}.xlsx)


def _read_prediction_table(path: Path) -> dict[str, dict]:
    """VLMEvalKit's prediction file (xlsx, or tsv/csv with PRED_FORMAT) -> {index: {"index", "prediction"}}, read
    as its `evaluate` reads it: column names lower-cased, `str(prediction)` (an empty cell is the text "nan")."""
    from gmaivl_rt.extras import require

    require("pandas", extra="eval")
    import pandas as pd

    try:
        if path.suffix.lower() == ".xlsx":
            require("openpyxl", extra="eval")
            frame = pd.read_excel(path)
        else:
            frame = pd.read_csv(path, sep="\t" if path.suffix.lower() == ".tsv" else ",")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"predictions file {path.name!r} is not a readable table ({type(e).__name__})") from None
    frame.columns = [str(c).lower() for c in frame.columns]
    if "index" not in frame.columns or "prediction" not in frame.columns:
        raise InputError(f"predictions file {path.name!r} needs `index` and `prediction` columns")
    found = {}
    for index, prediction in zip(frame["index"], frame["prediction"]):
        index = str(index)
        if index in found:
            raise InputError(f"predictions file {path.name!r}: index {index[:20]!r} occurs twice")
        found[index] = {"index": index, "prediction": str(prediction)}
    return found


def read_predictions(path, repair: bool = False) -> dict[str, dict]:
    """predictions.jsonl (or VLMEvalKit's own prediction table, `_read_prediction_table`) -> {index: line}. A torn last line (a run killed mid-write) is dropped with a warning, and
    with `repair` cut from the file so appending continues cleanly; any other bad line, a repeated index or a
    `prediction` that is not text is an error. `path` may be a pipe."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"predictions file {str(path)!r} does not exist")
    if path.is_dir():
        raise InputError(f"predictions file {str(path)!r} is a folder")
    if path.suffix.lower() in PREDICTION_TABLES:
        return _read_prediction_table(path)
    with open(path, "rb") as f:
        data = f.read()
    complete = data[:data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        warnings.warn(f"predictions file {path.name!r}: its last line is incomplete (a run killed mid-write); "
                      "dropped", stacklevel=2)
        if repair and stat.S_ISREG(path.stat().st_mode):
            with open(path, "r+b") as f:
                f.truncate(len(complete))
                os.fsync(f.fileno())
    found = {}
    try:
        text = complete.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"predictions file {path.name!r} is not UTF-8 text") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise InputError(f"predictions file {path.name!r}, line {number}: not valid JSON") from None
        if not isinstance(row, dict) or "index" not in row or "prediction" not in row:
            raise InputError(f"predictions file {path.name!r}, line {number}: needs `index` and `prediction`")
        if not isinstance(row["prediction"], str):
            raise InputError(f"predictions file {path.name!r}, line {number}: `prediction` is "
                             f"{type(row['prediction']).__name__}, not text")
        index = str(row["index"])
        if index in found:
            raise InputError(f"predictions file {path.name!r}, line {number}: index {index[:20]!r} occurs twice")
        found[index] = row
    return found


def _append_line(handle, row: dict) -> None:
    handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    handle.flush()
    os.fsync(handle.fileno())


def _cluster_key(item) -> str:
    """The image identity the bootstrap resamples by (a hash: no file name or pixel data in the outputs)."""
    digest = hashlib.sha256()
    for ref in item.images:
        digest.update((ref.data if isinstance(ref, Base64Image) else str(Path(ref).resolve())).encode())
        digest.update(b"\0")
    return digest.hexdigest()[:16] if item.images else f"item:{item.index}"


def _scored_line(item, prediction: str, scorer: str) -> dict:
    """The predictions.jsonl fields of one scored item (without `prompt`)."""
    result = score_prediction(item, prediction, scorer)
    line = {"index": item.index, "prediction": prediction, "extracted": result["extracted"],
            "answer": item.answer, "correct": result["correct"], "score": result["score"], "split": item.split,
            "cluster": _cluster_key(item), **item.groups}
    line.update({k: result[k] for k in ("recall", "precision", "f1", "exact_match") if k in result})
    if item.g_index is not None:
        line["g_index"] = item.g_index
    line["parsed"] = result["parsed"]
    return line


def _unit_rows(items, lines: dict[str, dict], evaluation: str) -> list[dict]:
    """The rows `report.aggregate` counts: one per item, or for a circular run one per question with rotations
    (VLMEvalKit `mcq_circular_eval`: the row whose index equals its g_index stands for the group, right only if
    every rotation present is extracted as its own gold letter). Sets each line's `circular_correct`."""
    def row(item, line, correct, chance):
        # a circular group's score is its verdict; an item's is its own (an open item's recall under LLaVA-Med)
        score = None if correct is None else (float(correct) if evaluation == "circular" else line["score"])
        return {"kind": item.kind, "correct": correct, "score": score, "parsed": line["parsed"],
                "chance": chance, "groups": item.groups, "split": item.split, "cluster": line["cluster"],
                **{k: line[k] for k in ("precision", "f1", "exact_match") if k in line}}

    def options_of(item):
        return max(1, len(item.options if item.scoring_options is None else item.scoring_options))

    if evaluation != "circular":
        return [row(i, lines[i.index], lines[i.index]["correct"], 1 / options_of(i)) for i in items]
    groups: dict[str, list] = {}
    for item in items:
        groups.setdefault(item.g_index, []).append(item)
    rows = []
    for item in items:
        if item.index != item.g_index:
            continue
        members = groups[item.g_index]
        verdicts = [lines[m.index]["correct"] for m in members]
        correct = None if any(v is None for v in verdicts) else all(verdicts)
        for m in members:
            lines[m.index]["circular_correct"] = correct
        chance = 1.0
        for m in members:
            chance /= options_of(m)
        rows.append(row(item, {**lines[item.index], "parsed": all(lines[m.index]["parsed"] for m in members)},
                        correct, chance))
    return rows


def _check_out(out) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"output folder (--out) {str(out)!r} is an existing file")
    return out


# ------------------------------------------------------------------------------------------------ API
def _check_images(items) -> None:
    """Every image file exists, checked before the model loads (a missing one found after hours is a lost run)."""
    for item in items:
        for n, ref in enumerate(item.images, 1):
            if not isinstance(ref, Base64Image) and not Path(ref).is_file():
                raise InputError(f"benchmark item {item.index}: image {n} was not found (looked beside the benchmark "
                                 "file and in its image folders)")


def _shard_batches(count: int, batch_size: int, shard: tuple[int, int] | None) -> list[range]:
    """The fixed batches of an item list (slices of `batch_size`); a shard (i, n) takes batches i, i + n, ...: an
    item is answered in the same batch (same padding) as in the unsharded run, so merged shards equal it."""
    batches = [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]
    if shard is None:
        return batches
    index, total = shard
    if total < 1 or not 0 <= index < total:
        raise InputError(f"shard {index}/{total}: the index must be in 0..count-1 and count >= 1")
    return batches[index::total]


def _resolve_scorer(protocol: str, scorer: str | None) -> str | None:
    if protocol == "mcq":
        if scorer is not None:
            raise InputError("--scorer chooses the closed/open rule; multiple-choice files use their kit's rule")
        return None
    scorer = scorer or DEFAULT_CLOSED_OPEN_SCORER
    if scorer not in CLOSED_OPEN_SCORERS:
        raise InputError(f"scorer (--scorer) {scorer!r} is not one of {', '.join(CLOSED_OPEN_SCORERS)}")
    return scorer


def evaluate(model_dir, data, out, *, format: str = "auto", protocol: str | None = None, backend: str = "torch",
             batch_size: int = 8, limit: int | None = None, resume: bool = False, progress: bool = True,
             generation_config="auto", scorer: str | None = None, language: str = "en",
             shard: tuple[int, int] | None = None, constrained: bool = False, **backend_kwargs) -> dict:
    """Answer every question of the benchmark file `data` with the model in `model_dir` and score the answers.
    Writes into `out`: predictions.jsonl (appended as it goes, one verdict per item), scores.json,
    scores_by_<column>.csv, scores.png and run.json. resume: continue an interrupted run in `out` (same data file,
    decoding, batch size and shard). generation_config: the decoding defaults `gmaivl_rt.load` resolves ("auto",
    "none" or a path); the protocol's decoding (`prompts.DECODING`) goes over them, and run.json records every
    decoding option used and where the defaults came from. scorer: closed/open rule ("llava-med" default,
    "lmms-eval"); language: SLAKE's questions ("en", "zh", "all"); shard: (i, n) answers only batches i, i+n, ...
    (join with `merge`). constrained: decode multiple-choice and yes/no items under `choice` (`item_constraint`),
    recorded in run.json ("constrained") and in the scores' notes; such a run is never resumed, merged or compared
    as an unconstrained one (the kits' published numbers are unconstrained). Returns scores.json's dict."""
    import gmaivl_rt

    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    if limit is not None and limit < 1:
        raise InputError(f"limit must be >= 1, got {limit}")
    out = _check_out(out)
    bench = read_benchmark(data, format, protocol, language)
    scorer = _resolve_scorer(bench.protocol, scorer)
    all_items = bench.items[:limit] if limit else bench.items
    batches = _shard_batches(len(all_items), batch_size, shard)
    items = [all_items[i] for batch in batches for i in batch]
    _check_images(items)
    predictions_path = out / PREDICTIONS
    data_sha256 = file_sha256(bench.path)
    previous = {}
    started_before = predictions_path.exists() and predictions_path.stat().st_size > 0
    if started_before:  # checked before the model loads: a wrong --out fails at once
        if not resume:
            raise InputError(f"{predictions_path} already exists: pass --resume to continue that run, or choose "
                             "another --out")
        previous = json.loads((out / "run.json").read_text()) if (out / "run.json").is_file() else {}
        if previous.get("data_sha256") not in (None, data_sha256):
            raise InputError("--resume: the benchmark file differs from the one this run started on")
        for key, value in (("batch_size", batch_size), ("shard", list(shard) if shard else None),
                           ("limit", limit), ("constrained", constrained)):
            if key in previous and previous[key] != value:
                raise InputError(f"--resume: {key} differs from the one this run started with ({previous[key]})")
    out.mkdir(parents=True, exist_ok=True)
    runtime = gmaivl_rt.load(model_dir, backend=backend, generation_config=generation_config, **backend_kwargs)
    # every option the answers are generated with: the model's defaults, the protocol's decoding over them
    decoding = {**runtime.generation_defaults, **decoding_for(bench.protocol, bench.format)}
    done = {}
    if started_before:
        started_with = previous.get("decoding") or {}
        if any(decoding.get(k) != v for k, v in started_with.items()):
            raise InputError("--resume: the decoding differs from the one this run started with (see run.json's "
                             "decoding and --generation-config)")
        done = read_predictions(predictions_path, repair=True)
    run_info = {"model": str(Path(model_dir).resolve()), "backend": backend, "placement": runtime.placement,
                "data": str(bench.path.resolve()),
                "data_sha256": data_sha256, "format": bench.format, "protocol": bench.protocol,
                "language": bench.language, "evaluation": bench.evaluation, "scorer": scorer,
                "prompts": _prompt_description(bench), "decoding": decoding,
                "generation_config": runtime.generation.origin, "batch_size": batch_size,
                "limit": limit, "shard": list(shard) if shard else None, "items": len(items),
                "scoring": _scoring_description(items, scorer), "notes": bench.notes, "constrained": constrained}
    if constrained:
        bench.notes.append(CONSTRAINED_NOTE)
    atomic_write_json(out / "run.json", {**run_info, "status": "running"})

    from tqdm.auto import tqdm

    started = time.perf_counter()
    bar = tqdm(total=len(items), initial=sum(i.index in done for i in items), unit="item", desc="eval",
               disable=not progress)
    handle = None
    try:
        # Batches are fixed slices of the item list, and a slice with any item left is generated whole: a resumed
        # run feeds the model the same batches (same padding) as an uninterrupted one.
        for batch_range in batches:
            batch = [all_items[i] for i in batch_range]
            if all(item.index in done for item in batch):
                continue
            try:
                answers = _answer_batch(runtime, [item_text(i) for i in batch],
                                        [[_image_input(ref) for ref in i.images] for i in batch], decoding,
                                        [item_constraint(i) for i in batch] if constrained else None)
            except InputError as error:  # name the benchmark rows: the runtime names only "image 1", "question"
                raise type(error)(f"benchmark items {batch[0].index}..{batch[-1].index}: {error}") from None
            if handle is None:  # created with its first line: a run failing before any answer leaves no file
                handle = open(predictions_path, "a", encoding="utf-8")
            for item, answer in zip(batch, answers):
                if item.index in done:
                    continue
                line = _scored_line(item, answer, scorer)
                _append_line(handle, {"index": item.index, "prompt": item_prompt(item), **line})
                done[item.index] = line
                bar.update(1)
    except BaseException as error:
        atomic_write_json(out / "run.json", {**run_info, "status": "failed", "error": f"{type(error).__name__}: "
                                             f"{error}"[:500]})
        raise
    finally:
        bar.close()
        if handle is not None:
            handle.close()
    # verdicts recomputed from the answers: lines a resumed run wrote under an older version score the same way
    lines = {i.index: {"index": i.index, "prompt": item_prompt(i), **_scored_line(i, done[i.index]["prediction"],
                                                                                 scorer)} for i in items}
    scores = _score_items(bench, items, lines, out, scorer)
    atomic_write_json(out / "run.json", {**run_info, "status": "done", "seconds": time.perf_counter() - started,
                                         "unparsed": scores["unparsed"]})
    return scores


def score(predictions, data, out, *, format: str = "auto", protocol: str | None = None, scorer: str | None = None,
          language: str = "en") -> dict:
    """Rescore a predictions file (lines with `index` and `prediction`; `prompt` and `answer`, when present, must be
    this benchmark's) against the benchmark file `data`, without a model: predictions.jsonl with each item's
    verdict, scores.json, the per-group CSVs and scores.png in `out`. Returns scores.json's dict."""
    out = _check_out(out)
    predictions = Path(predictions)
    if (out / PREDICTIONS).exists() and (out / PREDICTIONS).resolve() == predictions.resolve():
        raise InputError(f"output folder (--out) holds the predictions file being rescored; choose another --out")
    bench = read_benchmark(data, format, protocol, language)
    scorer = _resolve_scorer(bench.protocol, scorer)
    found = read_predictions(predictions)
    if not found:
        raise InputError(f"predictions file {predictions.name!r} holds no predictions")
    by_index = {item.index: item for item in bench.items}
    unknown = [i for i in found if i not in by_index]
    if unknown:
        raise InputError(f"predictions file: {len(unknown)} index(es) not in the benchmark file, e.g. "
                         f"{unknown[0][:20]!r}")
    mismatched = [i for i, line in found.items()
                  if ("prompt" in line and line["prompt"] != item_prompt(by_index[i]))
                  or ("answer" in line and line["answer"] != by_index[i].answer)]
    if mismatched:
        raise InputError(f"predictions file: {len(mismatched)} line(s) carry a prompt or answer that is not this "
                         f"benchmark's (answers to another file?), e.g. index {mismatched[0][:20]!r}")
    items = [item for item in bench.items if item.index in found]
    lines = {}
    for item in items:
        lines[item.index] = _scored_line(item, found[item.index]["prediction"], scorer)
        if "prompt" in found[item.index]:
            lines[item.index] = {"index": item.index, "prompt": found[item.index]["prompt"], **lines[item.index]}
    out.mkdir(parents=True, exist_ok=True)
    notes = list(bench.notes)
    if len(items) < len(bench.items):
        notes.append(f"{len(bench.items) - len(items)} of {len(bench.items)} questions have no prediction; "
                     "scored the rest")
    bench.notes = notes
    return _score_items(bench, items, lines, out, scorer, write_lines=True)


def _score_items(bench, items, lines: dict[str, dict], out: Path, scorer, write_lines: bool = False) -> dict:
    lines = {k: dict(v) for k, v in lines.items()}
    for line in lines.values():  # lines written by evaluate carry it; rescored ones are recomputed
        line.setdefault("parsed", True)
    rows = _unit_rows(items, lines, bench.evaluation)
    protocol = "mcq" if items and items[0].kind == "mcq" else "closed-open"
    scores = aggregate(rows, protocol, scorer=scorer, evaluation=bench.evaluation, notes=bench.notes)
    if write_lines or bench.evaluation == "circular":  # circular verdicts are known only now
        atomic_write_text(out / PREDICTIONS, "".join(json.dumps(lines[i.index], ensure_ascii=False) + "\n"
                                                     for i in items))
    write_report(out, scores, rows)
    return scores


# ------------------------------------------------------------------------------------------------ shards
def merge(shard_dirs, out) -> dict:
    """Join the output folders of `evaluate(..., shard=(i, n))` for every i of one n into `out`: predictions.jsonl
    in the benchmark's order (equal to the unsharded run's), run.json, scores. The shards must come from the same
    benchmark file, decoding, batch size and limit, and together hold every item once."""
    out = _check_out(out)
    runs = []
    for folder in shard_dirs:
        folder = Path(folder)
        run_path = folder / "run.json"
        if not run_path.is_file():
            raise InputError(f"shard folder {str(folder)!r} has no run.json")
        run = json.loads(run_path.read_text())
        if run.get("status") != "done":
            raise InputError(f"shard folder {str(folder)!r}: its run is {run.get('status')!r}, not done")
        if not run.get("shard"):
            raise InputError(f"shard folder {str(folder)!r} holds an unsharded run")
        runs.append((folder, run))
    first = runs[0][1]
    total = first["shard"][1]
    for folder, run in runs:
        for key in ("data_sha256", "decoding", "batch_size", "limit", "format", "protocol", "scorer", "language",
                    "constrained"):
            if run.get(key) != first.get(key):
                raise InputError(f"shard folder {str(folder)!r}: {key} differs from the first shard's")
        if run["shard"][1] != total:
            raise InputError(f"shard folder {str(folder)!r}: shard {run['shard'][0]}/{run['shard'][1]} is not of "
                             f"{total}")
    present = sorted(run["shard"][0] for _, run in runs)
    if present != list(range(total)):
        raise InputError(f"shards given: {present}; a merge needs each of 0..{total - 1} once")
    bench = read_benchmark(first["data"], first["format"], first["protocol"], first.get("language") or "en")
    if file_sha256(bench.path) != first["data_sha256"]:
        raise InputError("the benchmark file changed since the shards ran")
    items = bench.items[:first["limit"]] if first["limit"] else bench.items
    lines = {}
    for folder, _ in runs:
        for index, line in read_predictions(folder / PREDICTIONS).items():
            if index in lines:
                raise InputError(f"index {index[:20]!r} is in two shards")
            lines[index] = line
    missing = [i.index for i in items if i.index not in lines]
    if missing:
        raise InputError(f"{len(missing)} item(s) are in no shard, e.g. {missing[0][:20]!r}")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / PREDICTIONS, "".join(json.dumps(lines[i.index], ensure_ascii=False) + "\n"
                                                 for i in items))
    scores = _score_items(bench, items, lines, out, first.get("scorer"))
    atomic_write_json(out / "run.json", {**first, "shard": None, "items": len(items), "status": "done",
                                         "merged_from": [str(Path(f).resolve()) for f, _ in runs],
                                         "seconds": sum(run.get("seconds", 0.0) for _, run in runs),
                                         "unparsed": scores["unparsed"]})
    return scores


# ------------------------------------------------------------------------------------------------ compare
def _units(lines: dict[str, dict]) -> dict[str, dict]:
    """index -> {"score", "cluster", "split", "groups", "extracted", "answer"} of a run's scored units (circular
    runs: the groups' main rows)."""
    units = {}
    for index, line in lines.items():
        if "score" not in line or "cluster" not in line:
            raise InputError(f"predictions line {index[:20]!r} has no verdict (`score`, `cluster`): rescore it with "
                             "`eval score` first")
        if "g_index" in line and "circular_correct" in line:
            if line["g_index"] != index:
                continue
            value = line["circular_correct"]
        else:
            value = line["score"]
        if value is None:
            continue
        units[index] = {"score": float(value), "cluster": line["cluster"], "split": line.get("split"),
                        "groups": {k: v for k, v in line.items() if k not in LINE_FIELDS and k != "parsed"},
                        "extracted": line.get("extracted"), "answer": line.get("answer")}
    return units


def compare(run_a, run_b) -> dict:
    """Per-group differences between two runs over the items both scored: {"count", "groups": [{"split", "column",
    "value", "count", "a", "b", "difference", "ci95"}], "changed": [{"index", "a", "b", "answer", "a_score",
    "b_score"}]}; `difference` = b - a with a paired 95 % bootstrap interval resampled by image."""
    units = []
    for run in (run_a, run_b):
        path = Path(run)
        path = path / PREDICTIONS if path.is_dir() else path
        units.append(_units(read_predictions(path)))
    a, b = units
    shared = [i for i in a if i in b]
    if not shared:
        raise InputError("the two runs share no scored item: they are not runs of one benchmark")
    cells: dict[tuple, list[str]] = {}
    for index in shared:
        split = a[index]["split"]
        cells.setdefault((split, "overall", "all"), []).append(index)
        for column, value in a[index]["groups"].items():
            cells.setdefault((split, column, value), []).append(index)
    groups = []
    for (split, column, value), members in sorted(cells.items(), key=lambda kv: (str(kv[0][0]), kv[0][1] != "overall",
                                                                                  kv[0][1], str(kv[0][2]))):
        xs, ys = [a[i]["score"] for i in members], [b[i]["score"] for i in members]
        mean_a, mean_b = sum(xs) / len(xs), sum(ys) / len(ys)
        groups.append({"split": split, "column": column, "value": value, "count": len(members), "a": mean_a,
                       "b": mean_b, "difference": mean_b - mean_a,
                       "ci95": paired_bootstrap_ci(xs, ys, [a[i]["cluster"] for i in members])})
    changed = [{"index": i, "a": a[i]["extracted"], "b": b[i]["extracted"], "answer": a[i]["answer"],
                "a_score": a[i]["score"], "b_score": b[i]["score"]}
               for i in shared if a[i]["score"] != b[i]["score"]]
    return {"count": len(shared), "only_a": len(a) - len(shared), "only_b": len(b) - len(shared), "groups": groups,
            "changed": changed}


def _prompt_description(bench) -> dict:
    from gmaivl_rt.eval import prompts

    if bench.protocol == "mcq":
        if bench.format == "huatuo":
            return {"template": "<image>\\n{question}\\nA. {A}\\nB. {B}...\\n" + prompts.MCQ_INSTRUCTION,
                    "source": "HuatuoGPT-Vision eval.py llava_prompt (always English)"}
        return {"template": "<image>\\n{hint}\\n{question}\\nA. {A}\\nB. {B}...\\n" + prompts.MCQ_INSTRUCTION,
                "instruction_zh": prompts.MCQ_INSTRUCTION_ZH, "source": "VLMEvalKit LLaVA-XTuner build_prompt"}
    return {"template": "<image>\\n{question.strip()}\\n" + prompts.CLOSED_OPEN_INSTRUCTION,
            "instruction_zh": prompts.CLOSED_OPEN_INSTRUCTION_ZH, "source": "lmms-eval slake doc_to_text"}


def _scoring_description(items, scorer) -> str:
    scorers = {item.scorer for item in items}
    names = {"vlmevalkit": "VLMEvalKit can_infer (exact_matching, unparsed -> Z = wrong)",
             "huatuo": "HuatuoGPT-Vision match_choice3",
             "closed-open": {"llava-med": "LLaVA-Med v1.0.0 run_eval: closed yes/no substring hit, open token recall",
                             "lmms-eval": "lmms-eval slake: exact match after normalize_answer"}.get(scorer, "")}
    return "; ".join(names[s] for s in sorted(scorers))

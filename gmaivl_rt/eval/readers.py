"""Benchmark files as the public kits read them -> a list of `Item`s.

Formats: VLMEvalKit TSV (GMAI-MMBench, OmniMedVQA, MMMU, any MCQ TSV), HuatuoGPT-Vision's
`medical_multimodel_evaluation_data.json`, SLAKE JSON, VQA-RAD (OSF JSON, or CSV rows `image,question,answer`) and
PMC-VQA CSV. Images stay references (a file path, or base64 text from a TSV) until the runner reads them through
`gmaivl_rt.medical.convert`."""
from __future__ import annotations

import csv
import json
import string
from dataclasses import dataclass, field
from pathlib import Path

from gmaivl_rt.errors import InputError

FORMATS = ("vlmevalkit", "huatuo", "slake", "vqa-rad", "pmc-vqa")
PROTOCOLS = ("mcq", "closed-open")
DEFAULT_PROTOCOL = {"vlmevalkit": "mcq", "huatuo": "mcq", "pmc-vqa": "mcq", "slake": "closed-open",
                    "vqa-rad": "closed-open"}
# Columns VLMEvalKit (and GMAI-MMBench's per-group tables) report by, when a TSV has them.
TSV_GROUP_COLUMNS = ("split", "category", "l2-category", "clinical vqa task", "department",
                     "perceptual granularity", "modality", "question_type", "dataset")
IMAGE_REUSE_MAX_CHARS = 64  # VLMEvalKit: an `image` value this short is the `index` of the row whose image it reuses


@dataclass(frozen=True)
class Base64Image:
    """An image carried inline (VLMEvalKit TSV `image` column)."""
    data: str


@dataclass
class Item:
    """One benchmark question.

    kind: "mcq" | "closed" | "open". answer: the gold option letter (mcq) or answer text; None = not scored
    (e.g. GMAI-MMBench test). options: {letter: text} for mcq. images: file paths or `Base64Image`s.
    scorer: "vlmevalkit" | "huatuo" | "closed-open". groups: grouping column -> value, reported per value."""
    index: str
    question: str
    kind: str
    answer: str | None
    scorer: str
    options: dict[str, str] = field(default_factory=dict)
    hint: str | None = None
    images: list = field(default_factory=list)
    groups: dict[str, str] = field(default_factory=dict)
    scoring_options: dict[str, str] | None = None  # options the scorer reads when they differ from the prompt's


@dataclass
class Benchmark:
    path: Path
    format: str
    protocol: str
    items: list[Item]


def read_benchmark(path, format: str = "auto", protocol: str | None = None) -> Benchmark:
    """Read a benchmark file. format: "auto" or one of FORMATS; protocol: None (the format's default), "mcq" or
    "closed-open". Raises InputError naming the file (by role) and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"benchmark file (--data) {str(path)!r} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise InputError(f"benchmark format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    protocol = protocol or DEFAULT_PROTOCOL[fmt]
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    reader = {"vlmevalkit": read_vlmevalkit_tsv, "huatuo": read_huatuo_json, "slake": read_slake,
              "vqa-rad": read_vqa_rad, "pmc-vqa": read_pmc_vqa}[fmt]
    items = reader(path, protocol)
    if not items:
        raise InputError(f"benchmark file (--data) {path.name!r} holds no {protocol} questions")
    seen = set()
    for item in items:
        if item.index in seen:
            raise InputError(f"benchmark file (--data) {path.name!r}: index {item.index!r} occurs twice")
        seen.add(item.index)
    return Benchmark(path, fmt, protocol, items)


def detect_format(path: Path) -> str:
    """By suffix and the first record's fields."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "vlmevalkit"
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        if "Figure_path" in header:
            return "pmc-vqa"
        if {"image", "question", "answer"} <= set(header):
            return "vqa-rad"
    if suffix == ".json":
        first = _first_record(path)
        if "img_name" in first:
            return "slake"
        if "image_name" in first:
            return "vqa-rad"
        if "options" in first:
            return "huatuo"
    raise InputError(f"benchmark file (--data) {path.name!r}: cannot tell its format; pass --format "
                     f"({', '.join(FORMATS)})")


def _load_json_list(path: Path) -> list[dict]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"benchmark file (--data) {path.name!r} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise InputError(f"benchmark file (--data) {path.name!r} must hold a JSON list of objects")
    return data


def _first_record(path: Path) -> dict:
    data = _load_json_list(path)
    return data[0] if data else {}


def _require(record: dict, keys, path: Path, where: str) -> None:
    missing = [k for k in keys if k not in record]
    if missing:
        raise InputError(f"benchmark file (--data) {path.name!r}, {where}: missing field(s) {', '.join(missing)}")


def _resolve_image(root: Path, name: str, subfolders=()) -> Path:
    """`name` relative to the benchmark file's folder, or to one of its usual image subfolders."""
    candidates = [root / name] + [root / sub / name for sub in subfolders]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return candidates[0]  # reported as missing when the runner reads it


# ------------------------------------------------------------------------------------------------ VLMEvalKit TSV
def read_vlmevalkit_tsv(path: Path, protocol: str = "mcq") -> list[Item]:
    """VLMEvalKit's TSV, read with pandas as VLMEvalKit reads it (so empty and "nan"-like cells are absent
    options). `image` values of 64 characters or fewer name the `index` of the row whose image they reuse;
    `image_path` (relative to the file) is used when there is no `image` column; a missing or empty `answer` means
    the row is predicted but not scored."""
    if protocol != "mcq":
        raise InputError("VLMEvalKit TSV benchmarks are multiple choice: use --protocol mcq")
    from gmaivl_rt.extras import require

    require("pandas", extra="eval")
    import pandas as pd

    try:
        frame = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"benchmark file (--data) {path.name!r} is not a readable TSV ({type(e).__name__})") \
            from None
    _require(set(frame.columns), ["index", "question"], path, "header")
    if "image" not in frame.columns and "image_path" not in frame.columns:
        raise InputError(f"benchmark file (--data) {path.name!r}: needs an `image` or `image_path` column")
    records = frame.to_dict("records")
    indexes = [str(r["index"]) for r in records]
    images = {}
    if "image" in frame.columns:
        images = {i: str(r["image"]) for i, r in zip(indexes, records)}
        for key, value in list(images.items()):
            if len(value) <= IMAGE_REUSE_MAX_CHARS:
                if value not in images or len(images[value]) <= IMAGE_REUSE_MAX_CHARS:
                    raise InputError(f"benchmark file (--data) {path.name!r}, row index {key}: its image refers to "
                                     f"index {value[:20]!r}, which has no image of its own")
                images[key] = images[value]
    items = []
    for index, record in zip(indexes, records):
        options = {letter: str(record[letter]) for letter in string.ascii_uppercase
                   if letter in record and not pd.isna(record[letter])}
        answer = record.get("answer")
        answer = None if answer is None or pd.isna(answer) else str(answer).strip()
        scoring_options = None
        if not options:
            if answer is None:
                raise InputError(f"benchmark file (--data) {path.name!r}, row index {index}: no options (columns "
                                 "A..Z) and no answer")
            # VLMEvalKit's MMMU_preproc: an open question is asked without options and scored as the choice
            # between A = its answer and B = "Other Answers" (gold A)
            scoring_options, answer = {"A": answer, "B": "Other Answers"}, "A"
        elif answer is not None and answer not in options:
            raise InputError(f"benchmark file (--data) {path.name!r}, row index {index}: answer {answer[:8]!r} "
                             "is not one of its option letters")
        hint = record.get("hint")
        hint = None if hint is None or pd.isna(hint) else str(hint)
        if images:
            refs = [Base64Image(b) for b in _image_list(images[index])]
        else:
            refs = [_resolve_image(path.parent, p, ("images",)) for p in _image_list(str(record["image_path"]))]
        groups = {c: str(record[c]) for c in TSV_GROUP_COLUMNS if c in record and not pd.isna(record[c])}
        items.append(Item(index=index, question=str(record["question"]), kind="mcq", answer=answer,
                          scorer="vlmevalkit", options=options, hint=hint, images=refs, groups=groups,
                          scoring_options=scoring_options))
    return items


def _image_list(value: str) -> list[str]:
    """A cell holding one image or a Python-style list of them (VLMEvalKit's multi-image rows)."""
    if value.startswith("[") and value.endswith("]"):
        import ast

        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return [value]
        if isinstance(parsed, list):
            return [str(v) for v in parsed]
    return [value]


# ------------------------------------------------------------------------------------------------ HuatuoGPT-Vision
def read_huatuo_json(path: Path, protocol: str = "mcq") -> list[Item]:
    """HuatuoGPT-Vision's evaluation list. mcq (its `score_mix_llava`): drops `question_type == "open"` and items
    without options, keeps the first item of each `test_id`; the gold letter is the answer's position among the
    options ("?" answers count as wrong). closed-open: every item, scored on its answer text."""
    records = _load_json_list(path)
    items, seen = [], set()
    letters = string.ascii_uppercase
    for n, record in enumerate(records):
        _require(record, ["question", "answer"], path, f"item {n}")
        options = record.get("options") or []
        groups = {"dataset": str(record.get("dataset", "")) or "unknown"}
        if record.get("subset"):
            groups["subset"] = f"{groups['dataset']}_{record['subset']}"
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        refs = [_resolve_image(path.parent, str(p), ("images",)) for p in images]
        index = str(record.get("test_id", n))
        if protocol == "mcq":
            if record.get("question_type") == "open" or not options:
                continue
            if "test_id" in record:
                if record["test_id"] in seen:
                    continue
                seen.add(record["test_id"])
            answer = str(record["answer"])
            if answer == "?":
                gold = "?"
            elif answer in options:
                gold = letters[options.index(answer)]
            else:
                raise InputError(f"benchmark file (--data) {path.name!r}, item {n}: its answer is not one of "
                                 "its options")
            items.append(Item(index=index, question=str(record["question"]), kind="mcq", answer=gold,
                              scorer="huatuo", options={letters[i]: str(o) for i, o in enumerate(options)},
                              images=refs, groups=groups))
        else:
            kind = "open" if record.get("question_type") == "open" else "closed"
            items.append(Item(index=str(n), question=str(record["question"]), kind=kind,
                              answer=str(record["answer"]), scorer="closed-open", images=refs,
                              groups={**groups, "answer_type": kind}))
    return items


# ------------------------------------------------------------------------------------------------ SLAKE
def read_slake(path: Path, protocol: str = "closed-open", language: str = "en") -> list[Item]:
    """SLAKE's JSON (`img_name`, `question`, `answer`, `answer_type` OPEN/CLOSED, `q_lang`, `modality`,
    `content_type`, `location`), English questions by default; images under the file's folder or `imgs/`."""
    if protocol != "closed-open":
        raise InputError("SLAKE has no options: use --protocol closed-open (HuatuoGPT-Vision's file carries its "
                         "multiple-choice version)")
    items = []
    for n, record in enumerate(_load_json_list(path)):
        _require(record, ["img_name", "question", "answer", "answer_type"], path, f"item {n}")
        if language and str(record.get("q_lang", "en")) != language:
            continue
        kind = "closed" if str(record["answer_type"]).strip().upper() == "CLOSED" else "open"
        groups = {"answer_type": kind}
        groups.update({k: str(record[k]) for k in ("modality", "content_type", "location") if record.get(k)})
        items.append(Item(index=str(record.get("qid", n)), question=str(record["question"]), kind=kind,
                          answer=str(record["answer"]), scorer="closed-open",
                          images=[_resolve_image(path.parent, str(record["img_name"]), ("imgs",))], groups=groups))
    return items


# ------------------------------------------------------------------------------------------------ VQA-RAD
_YES_NO = {"yes", "no"}
VQA_RAD_TEST_PHRASES = ("test_freeform", "test_para")


def read_vqa_rad(path: Path, protocol: str = "closed-open") -> list[Item]:
    """VQA-RAD: the OSF JSON (`image_name`, `question`, `answer`, `answer_type`, `question_type`, `phrase_type`;
    the test set is `phrase_type` test_freeform + test_para), or CSV rows `image,question,answer` (all rows, yes/no
    answers closed). Images under the file's folder or `VQA_RAD Image Folder/`."""
    if protocol != "closed-open":
        raise InputError("VQA-RAD has no options: use --protocol closed-open (HuatuoGPT-Vision's file carries its "
                         "multiple-choice version)")
    folders = ("VQA_RAD Image Folder", "images")
    items = []
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            for n, row in enumerate(csv.DictReader(f)):
                answer = str(row["answer"]).strip()
                kind = "closed" if answer.lower() in _YES_NO else "open"
                items.append(Item(index=str(n), question=row["question"], kind=kind, answer=answer,
                                  scorer="closed-open", images=[_resolve_image(path.parent, row["image"], folders)],
                                  groups={"answer_type": kind}))
        return items
    for n, record in enumerate(_load_json_list(path)):
        _require(record, ["image_name", "question", "answer", "answer_type"], path, f"item {n}")
        if "phrase_type" in record and record["phrase_type"] not in VQA_RAD_TEST_PHRASES:
            continue
        kind = "closed" if str(record["answer_type"]).strip().upper() == "CLOSED" else "open"
        groups = {"answer_type": kind}
        if record.get("question_type"):
            groups["question_type"] = str(record["question_type"])
        items.append(Item(index=str(record.get("qid", n)), question=str(record["question"]), kind=kind,
                          answer=str(record["answer"]), scorer="closed-open",
                          images=[_resolve_image(path.parent, str(record["image_name"]), folders)], groups=groups))
    return items


# ------------------------------------------------------------------------------------------------ PMC-VQA
def read_pmc_vqa(path: Path, protocol: str = "mcq") -> list[Item]:
    """PMC-VQA's CSV (`Figure_path`, `Question`, `Choice A`..`Choice D` with their "A:" prefixes stripped,
    `Answer_label`); images under the file's folder or `images/`."""
    if protocol != "mcq":
        raise InputError("PMC-VQA is multiple choice: use --protocol mcq")
    items = []
    with open(path, newline="", encoding="utf-8") as f:
        for n, row in enumerate(csv.DictReader(f)):
            _require(row, ["Figure_path", "Question", "Answer_label"], path, f"row {n}")
            options = {}
            for letter in "ABCD":
                text = (row.get(f"Choice {letter}") or "").strip()
                if text[:2] in (f"{letter}:", f"{letter}."):
                    text = text[2:].strip()
                if text:
                    options[letter] = text
            answer = row["Answer_label"].strip() or None
            if answer is not None and answer not in options:
                raise InputError(f"benchmark file (--data) {path.name!r}, row {n}: Answer_label is not one of its "
                                 "option letters")
            items.append(Item(index=str(row.get("index") or n), question=row["Question"], kind="mcq", answer=answer,
                              scorer="vlmevalkit", options=options,
                              images=[_resolve_image(path.parent, row["Figure_path"], ("images", "figures"))]))
    return items

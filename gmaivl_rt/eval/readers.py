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
    split: str | None = None  # the file's `split` value: reported separately, never pooled (VLMEvalKit report_acc)
    g_index: str | None = None  # circular evaluation: the index of the question this row is a rotation of
    language: str | None = None  # the prompt's instruction language; None = decided by the question (VLMEvalKit)


@dataclass
class Benchmark:
    """items: the questions; evaluation: "vanilla" or "circular" (VLMEvalKit, where the file holds rotated copies);
    notes: what the reader applied that moves scores (dropped rows, answers that can never be right)."""
    path: Path
    format: str
    protocol: str
    items: list[Item]
    evaluation: str = "vanilla"
    notes: list[str] = field(default_factory=list)
    language: str | None = None


LANGUAGES = ("en", "zh", "all")


def read_benchmark(path, format: str = "auto", protocol: str | None = None, language: str = "en") -> Benchmark:
    """Read a benchmark file. format: "auto" or one of FORMATS; protocol: None (the format's default), "mcq" or
    "closed-open"; language: SLAKE's `q_lang` to keep ("en", "zh" or "all"; other formats ignore it). Raises
    InputError naming the file (by role) and the problem."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"benchmark file (--data) {str(path)!r} does not exist")
    if language not in LANGUAGES:
        raise InputError(f"language (--lang) {language!r} is not one of {', '.join(LANGUAGES)}")
    fmt = detect_format(path) if format == "auto" else format
    if fmt not in FORMATS:
        raise InputError(f"benchmark format {fmt!r} is not one of auto, {', '.join(FORMATS)}")
    protocol = protocol or DEFAULT_PROTOCOL[fmt]
    if protocol not in PROTOCOLS:
        raise InputError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    notes: list[str] = []
    if fmt == "vlmevalkit":
        items = read_vlmevalkit_tsv(path, protocol, notes)
    elif fmt == "slake":
        items = read_slake(path, protocol, language)
    else:
        items = {"huatuo": read_huatuo_json, "vqa-rad": read_vqa_rad, "pmc-vqa": read_pmc_vqa}[fmt](path, protocol)
    if not items:
        raise InputError(f"benchmark file (--data) {path.name!r} holds no {protocol} questions")
    seen = set()
    for item in items:
        if item.index in seen:
            raise InputError(f"benchmark file (--data) {path.name!r}: index {item.index!r} occurs twice")
        seen.add(item.index)
    evaluation = "circular" if any(i.g_index is not None and i.g_index != i.index for i in items) else "vanilla"
    if evaluation == "vanilla":
        for item in items:
            item.g_index = None
    return Benchmark(path, fmt, protocol, items, evaluation, notes, language if fmt == "slake" else None)


def detect_format(path: Path) -> str:
    """By suffix and the first record's fields."""
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        return "vlmevalkit"
    if suffix == ".csv":
        header, _ = _read_csv(path)
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


def _read_csv(path: Path) -> tuple[list[str], list[dict]]:
    """A CSV benchmark file -> (its header, its rows as dicts); unreadable text is an error naming the file."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return list(reader.fieldnames or ()), list(reader)
    except (UnicodeDecodeError, csv.Error) as e:
        raise InputError(f"benchmark file (--data) {path.name!r} is not a readable UTF-8 CSV ({type(e).__name__})") \
            from None


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
CIRCULAR_NAMES = ("mmbench", "ccbench", "circular", "mmcr")  # VLMEvalKit: names it evaluates circularly


def read_vlmevalkit_tsv(path: Path, protocol: str = "mcq", notes: list | None = None) -> list[Item]:
    """VLMEvalKit's TSV, read as its `ImageBaseDataset` and `ImageMCQDataset.evaluate` read it (VLMEvalKit main
    e8e78f0): pandas (empty and "nan"-like cells are absent), column names lower-cased except the option letters
    A..Z, rows with an empty `image` cell dropped, an `image` value of 1..64 characters names the `index` of the
    row whose image it reuses, `image_path` (relative to the file) when there is no `image` column. Answers are
    taken as written (a gold "B " never equals an extracted "B"); a missing answer cell counts wrong when other
    rows have answers (a file without any answer is predicted, not scored). Option-less rows: in an MMMU file
    (name holding "MMMU") `MMMU_preproc` (A = the answer, B = "Other Answers", gold = the answer when it is one
    capital letter, else A); elsewhere there is nothing to extract and they count wrong, as in the kit. Rotated
    copies (`g_index`, or for a name holding mmbench/ccbench/circular/mmcr the index modulo 10**6) make the run
    circular. `notes` collects what moved scores."""
    if protocol != "mcq":
        raise InputError("VLMEvalKit TSV benchmarks are multiple choice: use --protocol mcq")
    from gmaivl_rt.extras import require

    require("pandas", extra="eval")
    import pandas as pd

    notes = [] if notes is None else notes
    try:
        frame = pd.read_csv(path, sep="\t")
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"benchmark file (--data) {path.name!r} is not a readable TSV ({type(e).__name__})") \
            from None
    frame.columns = [c if c in string.ascii_uppercase else str(c).lower() for c in frame.columns]
    _require(set(frame.columns), ["index", "question"], path, "header")
    if "image" not in frame.columns and "image_path" not in frame.columns:
        raise InputError(f"benchmark file (--data) {path.name!r}: needs an `image` or `image_path` column")
    if "image" in frame.columns:
        empty = int(pd.isna(frame["image"]).sum())
        if empty:
            frame = frame[~pd.isna(frame["image"])]
            notes.append(f"{empty} row(s) with an empty image cell dropped (VLMEvalKit skip_noimg)")
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
    mmmu = "MMMU" in path.stem
    has_answers = "answer" in frame.columns and not bool(pd.isna(frame["answer"]).all())
    circular_by_name = any(name in path.stem.lower() for name in CIRCULAR_NAMES)
    counts = {"missing answer": 0, "answer not an option": 0, "no options": 0}
    items = []
    for index, record in zip(indexes, records):
        options = {letter: str(record[letter]) for letter in string.ascii_uppercase
                   if letter in record and not pd.isna(record[letter])}
        answer = None
        if has_answers:
            raw = record.get("answer")
            if raw is None or pd.isna(raw):
                answer, counts["missing answer"] = MISSING_ANSWER, counts["missing answer"] + 1
            else:
                answer = str(raw)
        scoring_options = None
        if mmmu:
            if "A" not in options and answer not in (None, MISSING_ANSWER):
                # MMMU_preproc: an open question is asked without options, scored as A = its answer or B
                scoring_options = {**options, "A": answer, "B": "Other Answers"}
            if answer is not None:  # the kit's answer map: a one-capital-letter answer stays, anything else is A
                answer = answer if len(answer) == 1 and answer in string.ascii_uppercase else "A"
        elif not options:
            counts["no options"] += 1
        if answer not in (None, MISSING_ANSWER) and answer not in (scoring_options or options):
            counts["answer not an option"] += 1
        hint = record.get("hint")
        hint = None if hint is None or pd.isna(hint) else str(hint)
        if images:
            refs = [Base64Image(b) for b in _image_list(images[index])]
        else:
            refs = [_resolve_image(path.parent, p, ("images",)) for p in _image_list(str(record["image_path"]))]
        groups = {c: str(record[c]) for c in TSV_GROUP_COLUMNS if c != "split" and c in record
                  and not pd.isna(record[c])}
        split = None
        if "split" in record:
            split = "none" if pd.isna(record["split"]) else str(record["split"])
        g_index = None
        if "g_index" in record and not pd.isna(record["g_index"]):
            g_index = _integer_text(record["g_index"])
        elif circular_by_name:
            try:
                g_index = str(int(float(index)) % 1_000_000)
            except ValueError:
                raise InputError(f"benchmark file (--data) {path.name!r}, row index {index}: circular evaluation "
                                 "(the file's name) needs integer indexes") from None
        items.append(Item(index=index, question=str(record["question"]), kind="mcq", answer=answer,
                          scorer="vlmevalkit", options=options, hint=hint, images=refs, groups=groups,
                          scoring_options=scoring_options, split=split, g_index=g_index))
    for what, count in counts.items():
        if count:
            notes.append(f"{count} row(s) with {what}: counted wrong, as VLMEvalKit counts them")
    return items


MISSING_ANSWER = ""  # a scored row whose answer cell is empty: no extraction equals it, so it counts wrong


def _integer_text(value) -> str:
    """A pandas cell holding an index (read as int, or float where the column has gaps) -> its text."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


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
HUATUO_OPTION_LETTERS = "ABCDEFGHIJK"  # its `opt_title`: the prompt and the gold label know eleven options


def _huatuo_options(record: dict, path: Path, n: int) -> list:
    """An item's `options`: a list, or a string holding a Python list literal (its `llava_prompt` reads those with
    `ast.literal_eval`)."""
    options = record.get("options") or []
    if isinstance(options, str):
        import ast

        try:
            options = ast.literal_eval(options)
        except (ValueError, SyntaxError):
            raise InputError(f"benchmark file (--data) {path.name!r}, item {n}: `options` is a string that is not "
                             "a list literal") from None
    if not isinstance(options, list):
        raise InputError(f"benchmark file (--data) {path.name!r}, item {n}: `options` must be a list of texts")
    if len(options) > len(HUATUO_OPTION_LETTERS):
        raise InputError(f"benchmark file (--data) {path.name!r}, item {n}: {len(options)} options; HuatuoGPT-Vision's "
                         f"prompt and scorer know {len(HUATUO_OPTION_LETTERS)} (A..K)")
    return options


def read_huatuo_json(path: Path, protocol: str = "mcq") -> list[Item]:
    """HuatuoGPT-Vision's evaluation list, as its `eval.py` (`TestDataset`) and `scorer.py` (`score_mix_llava`)
    read it (its evaluation code as issue 27 cites it, commit f699d88): items are numbered 1..N as `test_id` whatever the file says (so no item is a
    duplicate), options may be a list literal in a string; mcq drops `question_type == "open"` and items without
    options; the gold letter is the answer's position among the options ("?" answers count as wrong); the prompt is
    always its English one. closed-open: every item, scored on its answer text."""
    records = _load_json_list(path)
    items = []
    for n, record in enumerate(records):
        _require(record, ["question", "answer"], path, f"item {n}")
        options = _huatuo_options(record, path, n)
        groups = {"dataset": str(record.get("dataset", "")) or "unknown"}
        if record.get("subset"):
            groups["subset"] = f"{groups['dataset']}_{record['subset']}"
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else images
        refs = [_resolve_image(path.parent, str(p), ("images",)) for p in images]
        index = str(n + 1)  # its TestDataset: test_id = 1, 2, ... in file order
        if protocol == "mcq":
            if record.get("question_type") == "open" or not options:
                continue
            answer = str(record["answer"])
            if answer == "?":
                gold = "?"
            elif answer in options:
                gold = HUATUO_OPTION_LETTERS[options.index(answer)]
            else:
                raise InputError(f"benchmark file (--data) {path.name!r}, item {n}: its answer is not one of "
                                 "its options")
            items.append(Item(index=index, question=str(record["question"]), kind="mcq", answer=gold,
                              scorer="huatuo", options={HUATUO_OPTION_LETTERS[i]: str(o) for i, o in enumerate(options)},
                              images=refs, groups=groups, language="en"))
        else:
            kind = "open" if record.get("question_type") == "open" else "closed"
            items.append(Item(index=index, question=str(record["question"]), kind=kind,
                              answer=str(record["answer"]), scorer="closed-open", images=refs,
                              groups={**groups, "answer_type": kind}))
    return items


# ------------------------------------------------------------------------------------------------ SLAKE
def read_slake(path: Path, protocol: str = "closed-open", language: str = "en") -> list[Item]:
    """SLAKE's JSON (`img_name`, `question`, `answer`, `answer_type` OPEN/CLOSED, `q_lang`, `modality`,
    `content_type`, `location`); images under the file's folder or `imgs/`. language "en" / "zh": the items whose
    stripped, lower-cased `q_lang` is that (lmms-eval 75571cf `_process_docs`: "EN" kept, a missing `q_lang`
    dropped); "all": every item, each asked in its own language."""
    if protocol != "closed-open":
        raise InputError("SLAKE has no options: use --protocol closed-open (HuatuoGPT-Vision's file carries its "
                         "multiple-choice version)")
    items = []
    for n, record in enumerate(_load_json_list(path)):
        _require(record, ["img_name", "question", "answer", "answer_type"], path, f"item {n}")
        q_lang = str(record.get("q_lang") or "").strip().lower()
        if language != "all" and q_lang != language:
            continue
        kind = "closed" if str(record["answer_type"]).strip().upper() == "CLOSED" else "open"
        groups = {"answer_type": kind}
        groups.update({k: str(record[k]) for k in ("modality", "content_type", "location") if record.get(k)})
        items.append(Item(index=str(record.get("qid", n)), question=str(record["question"]), kind=kind,
                          answer=str(record["answer"]), scorer="closed-open",
                          images=[_resolve_image(path.parent, str(record["img_name"]), ("imgs",))], groups=groups,
                          language="zh" if q_lang == "zh" else "en"))
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
        header, rows = _read_csv(path)
        _require(set(header), ["image", "question", "answer"], path, "header")
        for n, row in enumerate(rows):
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
    header, rows = _read_csv(path)
    _require(set(header), ["Figure_path", "Question", "Answer_label"], path, "header")
    for n, row in enumerate(rows):
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

"""The source-dataset manifest (YAML or JSON) and its annotation files.

Manifest::

    datasets:
      - name: brain_tumour_seg        # -> annotations/<name>.jsonl; letters, digits, '_', '-', '.'
        task: segmentation            # classification | segmentation | detection | report | vqa | caption
        image_root: images            # folder of the source images (relative to the manifest file)
        annotations: seg.csv          # CSV, JSONL or a JSON list, relative to the manifest; not for `caption`
        labels: [tumour, oedema]      # label names; segmentation masks use value i for labels[i-1]
        modality: MRI                 # optional: overrides the DICOM Modality (NIfTI and PNG record none)
        body_part: brain              # optional: overrides BodyPartExamined
        department: neurology         # optional
        planes: [axial]               # NIfTI slicing planes (any of axial, coronal, sagittal)
        slice_step: 1                 # take every n-th frame / slice
        volume: 0                     # 4D NIfTI: which volume
        empty_slice_every: 10         # segmentation: keep every k-th slice whose mask is empty (0: none)
        window: null                  # optional CT window name (lung, mediastinum, bone, brain, abdomen) or [c, w]
        sample_ratio: 1.0             # copied to meta.json
        data_augment: false           # copied to meta.json
        metadata_vqa: false           # also ask modality / plane / body part / colour questions
        files: [a.dcm, b.nii.gz]      # caption task only: these files instead of every image under image_root

Annotation rows (CSV header or JSONL keys); paths are relative to `image_root`:

    all tasks        image            the source file (DICOM, NIfTI, PNG, JPEG, TIFF, BMP)
                     frame            optional: only this frame / slice index (default: all of them)
    classification   label            one of `labels`
    segmentation     mask             label mask: PNG/TIFF/BMP for 2D images, NIfTI for NIfTI volumes
    detection        boxes            JSON list of {"label": name, "box": [x0, y0, x1, y1]} in source pixels
    report           report           findings text; optional `impression`
    vqa              question, answer optional `options`: JSON list or "|"-separated string
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict, dataclass, field

TASKS = ("classification", "segmentation", "detection", "report", "vqa", "caption")
TASK_CODES = {"classification": "cls", "segmentation": "seg", "detection": "det", "report": "rep", "vqa": "vqa",
              "caption": "cap"}
REQUIRED_COLUMNS = {"classification": ("image", "label"), "segmentation": ("image", "mask"),
                    "detection": ("image", "boxes"), "report": ("image", "report"),
                    "vqa": ("image", "question", "answer"), "caption": ("image",)}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class ManifestError(ValueError):
    """The manifest or an annotation file is malformed; the message names the file and the field."""


@dataclass
class DatasetSpec:
    """One source dataset. Paths are absolute after `load_manifest`."""

    name: str
    task: str
    image_root: str
    annotations: str | None = None
    labels: list[str] = field(default_factory=list)
    modality: str | None = None
    body_part: str | None = None
    department: str | None = None
    planes: list[str] = field(default_factory=lambda: ["axial"])
    slice_step: int = 1
    volume: int = 0
    empty_slice_every: int = 10
    window: object = None
    sample_ratio: float = 1.0
    data_augment: bool = False
    # caption task only: the images to take (relative to image_root); default every image file found under it.
    files: list[str] | None = None
    # also write metadata question records (modality, plane, body part, colour) next to the captions.
    metadata_vqa: bool = False

    def fingerprint(self) -> dict:
        """The settings that change this dataset's records (for resume keys). Where the data lives is left out:
        a moved source folder still resumes (files are recognised by relative path, size and mtime)."""
        d = asdict(self)
        for key in ("sample_ratio", "data_augment", "image_root", "annotations"):
            d.pop(key)
        return d


def _spec_from_dict(entry: dict, base: str, where: str) -> DatasetSpec:
    if not isinstance(entry, dict):
        raise ManifestError(f"{where}: each dataset must be a mapping")
    unknown = set(entry) - set(DatasetSpec.__dataclass_fields__)
    if unknown:
        raise ManifestError(f"{where}: unknown field(s) {sorted(unknown)}")
    for key in ("name", "task", "image_root"):
        if not entry.get(key):
            raise ManifestError(f"{where}: missing '{key}'")
    spec = DatasetSpec(**entry)
    if not _NAME.match(spec.name):
        raise ManifestError(f"{where}: name {spec.name!r} may only hold letters, digits, '_', '-', '.'")
    if spec.task not in TASKS:
        raise ManifestError(f"{where}: task {spec.task!r} is not one of {TASKS}")
    if spec.task != "caption" and not spec.annotations:
        raise ManifestError(f"{where}: task {spec.task} needs an 'annotations' file")
    if spec.task in ("classification", "segmentation", "detection") and not spec.labels:
        raise ManifestError(f"{where}: task {spec.task} needs 'labels'")
    spec.labels = [str(x) for x in spec.labels]
    spec.planes = [spec.planes] if isinstance(spec.planes, str) else list(spec.planes)
    bad = [p for p in spec.planes if p not in ("axial", "coronal", "sagittal")]
    if bad:
        raise ManifestError(f"{where}: unknown plane(s) {bad}")
    spec.slice_step, spec.empty_slice_every, spec.volume = int(spec.slice_step), int(spec.empty_slice_every), \
        int(spec.volume)
    spec.sample_ratio = float(spec.sample_ratio)
    spec.image_root = os.path.normpath(os.path.join(base, spec.image_root))
    if spec.annotations:
        spec.annotations = os.path.normpath(os.path.join(base, spec.annotations))
    return spec


def load_manifest(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read a YAML (.yaml/.yml) or JSON manifest into dataset specs with absolute paths."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ManifestError(f"{path}: cannot read manifest ({e.strerror})") from None
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise ManifestError(f"{path}: not valid {'YAML' if path.endswith(('.yaml', '.yml')) else 'JSON'} ({e})") \
            from None
    entries = data.get("datasets") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ManifestError(f"{path}: expected a non-empty 'datasets' list")
    base = os.path.dirname(os.path.abspath(path))
    specs = [_spec_from_dict(e, base, f"{path}: datasets[{i}]") for i, e in enumerate(entries)]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ManifestError(f"{path}: dataset names must be unique, got {names}")
    return specs


def read_annotations(spec: DatasetSpec) -> list[dict]:
    """The rows of a dataset's annotation file (CSV or JSONL), each a dict (columns checked per row later)."""
    path = spec.annotations
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if path.endswith(".json"):  # one JSON list of rows
                try:
                    rows = json.load(f)
                except json.JSONDecodeError as e:
                    raise ManifestError(f"{path}: bad JSON ({e.msg}, line {e.lineno})") from None
                if not isinstance(rows, list):
                    raise ManifestError(f"{path}: a .json annotation file must hold a list of rows")
            elif path.endswith(".jsonl"):
                rows = []
                for line_no, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ManifestError(f"{path}:{line_no}: bad JSON ({e.msg})") from None
            else:
                rows = list(csv.DictReader(f))
    except OSError as e:
        raise ManifestError(f"{path}: cannot read annotations ({e.strerror})") from None
    if not all(isinstance(row, dict) for row in rows):
        raise ManifestError(f"{path}: every annotation row must be a mapping")
    return rows


def missing_columns(spec: DatasetSpec, row: dict) -> list[str]:
    """The task's required columns this row lacks (an empty detection box list is a valid 'no objects')."""
    return [c for c in REQUIRED_COLUMNS[spec.task] if row.get(c) is None or row.get(c) == ""]


def parse_boxes(value) -> list[dict]:
    """Detection `boxes` cell: JSON text or list of {"label", "box": [x0, y0, x1, y1]} -> list of dicts."""
    boxes = json.loads(value) if isinstance(value, str) else value
    if not isinstance(boxes, list):
        raise ValueError("boxes must be a list")
    for b in boxes:
        if not (isinstance(b, dict) and "label" in b and len(b.get("box", ())) == 4):
            raise ValueError(f"bad box entry {b!r}: expected {{'label': name, 'box': [x0, y0, x1, y1]}}")
    return boxes


def parse_options(value) -> list[str] | None:
    if value in (None, ""):
        return None
    if isinstance(value, list):
        return [str(v) for v in value]
    text = str(value)
    if text.startswith("["):
        return [str(v) for v in json.loads(text)]
    return [v.strip() for v in text.split("|") if v.strip()]

"""One source item -> GMAI-VL records: the picture(s) it holds read through the medical readers, stored once, and
templated conversations (caption, metadata questions, and the dataset's task: classification, segmentation,
detection, report or VQA), optionally rephrased by the rewriter hook. Each item has its own RNG seeded from
(seed, item), so a resumed or reordered run writes the same records."""
from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass, field

import numpy as np

from gmaivl_rt.data import templates as T
from gmaivl_rt.data.deid import find_phi, phi_values_of_file, safe_stem, safe_token, scrub
from gmaivl_rt.data.image_store import ImageStore
from gmaivl_rt.data.manifest import TASK_CODES, DatasetSpec, missing_columns, parse_boxes, parse_options
from gmaivl_rt.data.rewriter import rewrite_answers
from gmaivl_rt.medical.base import MaskError, MedicalImageError, detect_format, modality_name
from gmaivl_rt.medical.reader import iter_medical_images, read_medical_image
from gmaivl_rt.model.chat import IMAGE_TOKEN

# Records whose free text a rewriter may rephrase (answers with boxes, letters or numbers stay templated).
REWRITABLE_KINDS = ("cap", "cls", "rep")


class ItemError(Exception):
    """One source item cannot be converted; `kind` is a short category for the summary."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason



@dataclass
class ItemResult:
    records: list[dict] = field(default_factory=list)
    tags: list[dict] = field(default_factory=list)    # per record: modality, task, department, dim (summary)
    images: int = 0                                   # pictures converted
    empty_slices_skipped: int = 0
    rewrite_failures: int = 0


class Converter:
    """Converts one source item (an annotation row, or one file of a caption dataset) into records, storing its
    pictures in `store`. seed: template choice; rewriter: None or fn(text, context) -> str. `phi` holds the DICOM
    identity values of the item being converted (error texts are scrubbed of them)."""

    def __init__(self, store: ImageStore, seed: int, rewriter):
        self.store, self.seed, self.rewriter = store, seed, rewriter

    def convert(self, spec: DatasetSpec, row: dict) -> ItemResult:
        """One item -> its records and summary tags; raises ItemError when it cannot be converted."""
        self.phi: set[str] = set()
        missing = missing_columns(spec, row)
        if missing:
            raise ItemError("annotation", f"{row.get('image') or 'row'}: annotation lacks {missing}")
        rel = str(row["image"]).replace("\\", "/")
        path = os.path.join(spec.image_root, rel)
        if not os.path.isfile(path):
            raise ItemError("missing", f"{rel}: no such file under the dataset's image_root")
        fmt = detect_format(path)
        self.phi = phi = phi_values_of_file(path) if fmt == "dicom" else set()
        stem = safe_stem(rel, phi)
        # Seeded by what the item is, not where it lives: the same data gives the same text on any machine.
        rng_key = json.dumps([self.seed, spec.name, spec.task, row], sort_keys=True, default=str)
        rng = random.Random(int(hashlib.sha256(rng_key.encode()).hexdigest()[:16], 16))
        result = ItemResult()
        task = spec.task
        label = str(row.get("label", "")).strip() or None
        if task == "classification" and label not in spec.labels:
            raise ItemError("annotation", f"{rel}: label {label!r} is not in the dataset's labels")
        boxes = None
        if task == "detection":
            try:
                boxes = parse_boxes(row["boxes"])
            except (ValueError, TypeError) as e:
                raise ItemError("annotation", f"{rel}: bad boxes ({e})") from None
            unknown = sorted({b["label"] for b in boxes} - set(spec.labels))
            if unknown:
                raise ItemError("annotation", f"{rel}: box labels {unknown} are not in the dataset's labels")
        mask = os.path.join(spec.image_root, str(row["mask"])) if task == "segmentation" else None
        frame = row.get("frame")
        frame = int(frame) if frame not in (None, "") else None
        planes = spec.planes if fmt == "nifti" else [None]
        any_label = False
        empty_seen = 0
        try:
            for plane in planes:
                if frame is not None:
                    images = [read_medical_image(path, frame=frame, slice_index=frame, window=spec.window,
                                                 plane=plane or "axial", volume=spec.volume, mask=mask)]
                else:
                    images = iter_medical_images(path, window=spec.window, plane=plane or "axial",
                                                 volume=spec.volume, mask=mask, step=spec.slice_step)
                for image in images:
                    present = None
                    if task == "segmentation":
                        if image.mask.max() > len(spec.labels) or image.mask.min() < 0:
                            unnamed = sorted(set(np.unique(image.mask).tolist()) - set(range(len(spec.labels) + 1)))
                            raise ItemError("mask", f"{rel}: mask values {unnamed[:5]} have no label name "
                                                    f"(labels are 1..{len(spec.labels)})")
                        present = T.mask_facts(image.mask, spec.labels)
                        any_label |= bool(present)
                        if not present:
                            empty_seen += 1
                            if spec.empty_slice_every <= 0 or (empty_seen - 1) % spec.empty_slice_every:
                                result.empty_slices_skipped += 1
                                continue
                    self._image_records(spec, row, image, fmt, stem, rng, result, label, present, boxes)
        except MedicalImageError as e:
            raise ItemError("mask" if isinstance(e, MaskError) else "unreadable", scrub(str(e), phi)) from None
        if task == "segmentation" and not any_label:
            raise ItemError("mask", f"{rel}: mask is empty (no pixel carries a label 1..{len(spec.labels)})")
        return result

    def _image_records(self, spec, row, image, fmt, stem, rng, result, label, present, boxes):
        modality = spec.modality or modality_name(image.modality)
        dim = "3d" if fmt == "nifti" else "2d"
        facts = T.ImageFacts(
            modality=modality, body_part=spec.body_part or image.body_part, plane=image.orientation,
            department=spec.department, window_name=image.window_name, is_color=image.is_color,
            index=image.index, count=image.count, dim=dim,
            spacing_mm=image.pixel_spacing[0] if image.pixel_spacing else None, labels=spec.labels)
        where = f"_{image.orientation}_s{image.index:03d}" if fmt == "nifti" else \
            (f"_f{image.index:03d}" if image.count > 1 else "")
        file_part = stem + where
        records: list[tuple[str, str, T.Turns]] = []  # (kind, label token, turns)
        task = spec.task
        records.append(("cap", label or "none", T.caption_turns(facts, rng, label if task == "classification"
                                                                else None)))
        if spec.metadata_vqa:
            records.append(("vqa", "none", T.metadata_vqa_turns(facts, rng)))
        if task == "classification":
            records.append(("cls", label, T.classification_open_turns(facts, rng, label)))
            mc = T.classification_mc_turns(facts, rng, label)
            if mc:
                records.append(("cls-mc", label, mc))
        elif task == "segmentation":
            records.append(("seg", "+".join(present) or "empty", T.segmentation_turns(facts, rng, present)))
        elif task == "detection":
            grouped = normalised_boxes(boxes, image, fmt)
            records.append(("det", "+".join(sorted(grouped)) or "none", T.detection_turns(facts, rng, grouped)))
        elif task == "report":
            records.append(("rep", "none", T.report_turns(facts, rng, str(row["report"]), row.get("impression"))))
        elif task == "vqa":
            records.append(("vqa", "none", [turn for q, a, o in vqa_row_turns(row)
                                            for turn in T.vqa_turns(facts, rng, q, a, o)]))
        image_rel = self.store.put(image.pixels)
        result.images += 1
        for kind, label_token, turns in records:
            if self.rewriter is not None and kind in REWRITABLE_KINDS:
                context = {"modality": facts.modality, "body_part": facts.body_part, "plane": facts.plane,
                           "department": facts.department, "label": label}
                turns, failures = rewrite_answers(self.rewriter, turns, context)
                result.rewrite_failures += failures
            record_id = "#".join([dim, kind, safe_token(modality), spec.name, safe_token(label_token), file_part])
            record = {"image": image_rel, "conversations": conversation(turns), "id": record_id,
                      "width": image.width, "height": image.height}
            if self.phi and find_phi(json.dumps(record, ensure_ascii=False), self.phi):
                raise ItemError("deid", f"{file_part}: a record would contain a DICOM identity value; item dropped")
            result.records.append(record)
            result.tags.append({"dataset": spec.name, "modality": modality, "task": TASK_CODES[task], "kind": kind,
                                "department": spec.department or "unspecified", "dim": dim})


def vqa_row_turns(row: dict) -> list[tuple[str, str, list[str] | None]]:
    """A vqa row's (question, answer, options) turns. One turn: `question` and `answer` are text and `options` a
    list (or JSON / '|' text) or empty. Several turns about the same image (one multi-turn record, as GMAI-VL-5.5M's
    dialogues): `question` and `answer` are lists of the same length and `options`, when given, a list of one entry
    per turn (a list or empty). Raises ItemError("annotation") for any other shape."""
    questions, answers, options = row["question"], row["answer"], row.get("options")
    if not isinstance(questions, list) and not isinstance(answers, list):
        return [(str(questions), str(answers), parse_options(options))]
    if not (isinstance(questions, list) and isinstance(answers, list) and len(questions) == len(answers) > 0):
        raise ItemError("annotation", f"{row.get('image') or 'row'}: question and answer must both be text, or "
                                      "lists of the same length (one entry per turn)")
    if options in (None, ""):
        options = [None] * len(questions)
    if not isinstance(options, list) or len(options) != len(questions):
        raise ItemError("annotation", f"{row.get('image') or 'row'}: options of a multi-turn row must be a list "
                                      "with one entry per turn")
    if any(q in (None, "") or a in (None, "") for q, a in zip(questions, answers)):
        raise ItemError("annotation", f"{row.get('image') or 'row'}: a turn has an empty question or answer")
    return [(str(q), str(a), parse_options(o)) for q, a, o in zip(questions, answers, options)]


def conversation(turns: T.Turns) -> list[dict]:
    """[(question, answer)] -> GMAI-VL turns [{"from": "human"|"gpt", "value"}]; the first question carries the
    image slot (`<image>` and a newline)."""
    out = []
    for i, (question, answer) in enumerate(turns):
        out.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n" if i == 0 else "") + question})
        out.append({"from": "gpt", "value": answer})
    return out


def normalised_boxes(boxes, image, fmt) -> dict[str, list[list[float]]]:
    """Source-pixel boxes -> {label: [[x0, y0, x1, y1] in [0, 1], 3 decimals]} (scale-invariant, so valid for the
    square-pixel output too). Only 2D sources: a volume's boxes would need a slice and an orientation."""
    if fmt == "nifti":
        raise ItemError("annotation", "detection boxes are supported for 2D images (DICOM, PNG, ...) only")
    src_h, src_w = image.source_size or (image.height, image.width)
    grouped: dict[str, list[list[float]]] = {}
    for b in boxes:
        x0, y0, x1, y1 = (float(v) for v in b["box"])
        if not (0 <= x0 < x1 and 0 <= y0 < y1):
            raise ItemError("annotation", f"box {b['box']} is not [x0, y0, x1, y1] with x0 < x1, y0 < y1")
        if x1 > src_w or y1 > src_h:
            raise ItemError("annotation", f"box {b['box']} lies outside the {src_w}x{src_h} image")
        grouped.setdefault(str(b["label"]), []).append(
            [round(x0 / src_w, 3), round(y0 / src_h, 3), round(x1 / src_w, 3), round(y1 / src_h, 3)])
    return grouped

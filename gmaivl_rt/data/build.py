"""The converter: source datasets -> GMAI-VL-format conversations, images, meta-list, errors and summary.

    build_dataset(out_dir, manifest="sources.yaml")   # labelled datasets described by a manifest
    build_dataset(out_dir, input_dir="scans/")        # unlabelled images -> metadata-grounded captions
    build_dataset(out_dir, demo=True)                 # pydicom's and nibabel's shipped files

Output (OUT = out_dir):
    OUT/images/ab/<sha256[:20]>.png       every picture once, named by the hash of its RGB pixels
    OUT/annotations/<dataset>.jsonl        {"image": "ab/<hash>.png" (relative to image_dir), "conversations":
                                            [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...],
                                            "id": "dim#task#modality#dataset#label#file", "width", "height"}
    OUT/meta.json                          {dataset: {"image_dir": "images", "annotations":
                                            "annotations/<dataset>.jsonl", "sample_ratio", "length",
                                            "data_augment"}}; paths relative to OUT
    OUT/errors.jsonl                       {"dataset", "source", "kind", "reason"} per skipped item
    OUT/summary.json, OUT/summary.png      counts by modality, task, department, dataset, dimension
    OUT/build.log                          the run's log (no patient data)
    OUT/.work/                             per-item results, so a rerun resumes where it stopped

Every file is written to a temporary name and moved into place (os.replace). Each source item (one annotation
row, or one file for captions) is converted by itself with its own RNG seeded from (seed, item), so a resumed
or reordered run writes the same records.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib
import io
import json
import logging
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from gmaivl_rt.atomic import (atomic_create_bytes, atomic_write_bytes, atomic_write_json, atomic_write_jsonl,
                              atomic_write_text, remove_partial_files)
from gmaivl_rt.data import templates as T
from gmaivl_rt.data.deid import find_phi, phi_values_of_file, safe_path, safe_stem, safe_token, scrub
from gmaivl_rt.data.manifest import (TASK_CODES, DatasetSpec, ManifestError, load_manifest, missing_columns,
                                     parse_boxes, parse_options, read_annotations)
from gmaivl_rt.medical_io import (DICOM_SUFFIXES, NIFTI_SUFFIXES, PILLOW_SUFFIXES, MaskError, MedicalImageError,
                                  detect_format, iter_medical_images, modality_name, read_medical_image, safe_reason)

logger = logging.getLogger("gmaivl_rt.data")
IMAGE_TOKEN = "<image>"
_WORK_VERSION = 1
# Records whose free text a rewriter may rephrase (answers with boxes, letters or numbers stay templated).
REWRITABLE_KINDS = ("cap", "cls", "rep")


class ItemError(Exception):
    """One source item cannot be converted; `kind` is a short category for the summary."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


# --------------------------------------------------------------------------------------------------------------
# atomic files and the image store
# --------------------------------------------------------------------------------------------------------------
class ImageStore:
    """PNG files under `root`, named by the SHA-256 of the pixel array (shape included): identical pictures
    are stored once."""

    def __init__(self, root: str):
        self.root = root
        self.written = 0

    def put(self, pixels: np.ndarray) -> str:
        """pixels: (H, W, 3) uint8. Returns the path relative to `root` ('ab/abcdef....png')."""
        from PIL import Image

        digest = hashlib.sha256(repr(pixels.shape).encode() + np.ascontiguousarray(pixels).tobytes()).hexdigest()
        rel = f"{digest[:2]}/{digest[:20]}.png"
        path = os.path.join(self.root, rel)
        if not os.path.exists(path):
            buf = io.BytesIO()
            Image.fromarray(pixels, mode="RGB").save(buf, format="PNG", compress_level=3)
            self.written += atomic_create_bytes(path, buf.getvalue())  # a parallel worker may have won the race
        return rel


# --------------------------------------------------------------------------------------------------------------
# rewriter hook
# --------------------------------------------------------------------------------------------------------------
REWRITE_SYSTEM_PROMPT = (
    "You rewrite descriptions of medical images. Keep every fact (modality, anatomy, plane, labels, numbers) "
    "exactly, change only the wording, and answer with the rewritten text alone.")


def openai_rewriter(url: str, model: str = "default", timeout: float = 60.0, api_key: str | None = None):
    """A rewriter calling an OpenAI-compatible endpoint (POST {url}/v1/chat/completions) with urllib.

    Returns fn(text, context) -> str. The API key, if any, comes from `api_key` or $OPENAI_API_KEY."""
    import urllib.request

    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"
    key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    def rewrite(text: str, context: dict) -> str:
        facts = ", ".join(f"{k}: {v}" for k, v in sorted(context.items()) if v)
        body = {"model": model, "temperature": 0.7, "messages": [
            {"role": "system", "content": REWRITE_SYSTEM_PROMPT},
            {"role": "user", "content": f"Facts: {facts}\nText: {text}"}]}
        request = urllib.request.Request(endpoint, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json",
                                                  **({"Authorization": f"Bearer {key}"} if key else {})})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            reply = json.loads(response.read().decode("utf-8"))
        return str(reply["choices"][0]["message"]["content"]).strip()

    rewrite.identity = f"url:{endpoint}:{model}"
    return rewrite


def _import_from_path_or_cwd(module_name: str):
    """The module, searching the current folder last as `python -m` does (the console script does not);
    None when its top-level package is nowhere."""
    top = module_name.split(".")[0]
    for add_cwd in (False, True):
        if add_cwd:
            if os.getcwd() in sys.path:
                return None
            sys.path.append(os.getcwd())
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != top:
                raise
    return None


def load_rewriter(spec: str):
    """'package.module:function' -> that callable (fn(text: str, context: dict) -> str)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"rewriter {spec!r} must look like 'package.module:function'")
    module = _import_from_path_or_cwd(module_name)
    if module is None:
        raise ValueError(f"rewriter {spec!r}: no module {module_name!r} on the Python path or in the current folder")
    fn = getattr(module, attr, None)
    if fn is None:
        raise ValueError(f"rewriter {spec!r}: module {module_name!r} has no {attr!r}")
    if not callable(fn):
        raise ValueError(f"rewriter {spec!r} is not callable")
    return fn


# --------------------------------------------------------------------------------------------------------------
# demo datasets (the files pydicom and nibabel ship)
# --------------------------------------------------------------------------------------------------------------
DEMO_DICOM_FILES = (
    "CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm", "MR_small.dcm", "MR_small_bigendian.dcm",
    "MR_small_RLE.dcm", "MR_small_implicit.dcm", "MR_small_jp2klossless.dcm", "examples_overlay.dcm",
    "JPEG2000.dcm", "ExplVR_BigEnd.dcm", "examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm",
    "examples_jpeg2k.dcm", "SC_rgb.dcm", "SC_rgb_rle.dcm", "SC_rgb_rle_2frame.dcm", "SC_rgb_rle_16bit_2frame.dcm",
    "SC_rgb_jpeg_dcmtk.dcm", "SC_ybr_full_422_uncompressed.dcm", "SC_rgb_small_odd.dcm", "image_dfl.dcm",
    "rtdose.dcm", "liver_1frame.dcm",
)
# (file, volume) for 4D; all brain MRI (anatomical T1 and EPI time series).
DEMO_NIFTI_FILES = ("anatomical.nii", "example4d.nii.gz", "functional.nii", "example_nifti2.nii.gz")


def demo_datasets() -> list[DatasetSpec]:
    """The embedded demo: every frame of pydicom's decodable test images and every slice (three planes) of
    nibabel's brain MRI test volumes, as captions plus metadata questions. Only files present on disk are used
    (pydicom fetches some test files from the internet on demand; this never does)."""
    import nibabel.testing
    import pydicom.data

    dicom_root = os.path.join(os.path.dirname(pydicom.data.__file__), "test_files")
    nifti_root = nibabel.testing.data_path
    dicom = [f for f in DEMO_DICOM_FILES if os.path.isfile(os.path.join(dicom_root, f))]
    nifti = [f for f in DEMO_NIFTI_FILES if os.path.isfile(os.path.join(nifti_root, f))]
    specs = []
    if dicom:
        specs.append(DatasetSpec(name="demo_dicom", task="caption", image_root=dicom_root, files=dicom,
                                 department="radiology", metadata_vqa=True))
    if nifti:
        specs.append(DatasetSpec(name="demo_nifti_brain_mri", task="caption", image_root=nifti_root, files=nifti,
                                 modality="MRI", body_part="brain", department="neurology",
                                 planes=["axial", "coronal", "sagittal"], metadata_vqa=True))
    return specs


def input_dir_dataset(input_dir: str) -> DatasetSpec:
    """An unlabelled folder as a caption dataset named after the folder."""
    name = safe_token(os.path.basename(os.path.normpath(input_dir))) or "input"
    return DatasetSpec(name=name, task="caption", image_root=os.path.abspath(input_dir))


def discover_images(root: str) -> list[str]:
    """Image files under `root` (relative posix paths, sorted): known suffixes, or DICOM by its 'DICM' magic."""
    return _discover(root)[0]


def _discover(root: str) -> tuple[list[str], list[str]]:
    """(image files, other files) under `root`, relative posix paths, sorted; hidden files and folders ignored."""
    known = DICOM_SUFFIXES + NIFTI_SUFFIXES + tuple(PILLOW_SUFFIXES)
    found, others = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = os.path.join(dirpath, name)
            relative = os.path.relpath(path, root).replace(os.sep, "/")
            if name.lower().endswith(known) or ("." not in name and detect_format(path) == "dicom"):
                found.append(relative)
            else:
                others.append(relative)
    return found, others


# --------------------------------------------------------------------------------------------------------------
# one source item -> records
# --------------------------------------------------------------------------------------------------------------
@dataclass
class ItemResult:
    records: list[dict] = field(default_factory=list)
    tags: list[dict] = field(default_factory=list)    # per record: modality, task, department, dim (summary)
    images: int = 0                                   # pictures converted
    empty_slices_skipped: int = 0
    rewrite_failures: int = 0


class _Converter:
    def __init__(self, store: ImageStore, seed: int, rewriter):
        self.store, self.seed, self.rewriter = store, seed, rewriter

    def convert(self, spec: DatasetSpec, row: dict) -> ItemResult:
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
            grouped = _normalised_boxes(boxes, image, fmt)
            records.append(("det", "+".join(sorted(grouped)) or "none", T.detection_turns(facts, rng, grouped)))
        elif task == "report":
            records.append(("rep", "none", T.report_turns(facts, rng, str(row["report"]), row.get("impression"))))
        elif task == "vqa":
            records.append(("vqa", "none", T.vqa_turns(facts, rng, str(row["question"]), str(row["answer"]),
                                                       parse_options(row.get("options")))))
        image_rel = self.store.put(image.pixels)
        result.images += 1
        for kind, label_token, turns in records:
            if self.rewriter is not None and kind in REWRITABLE_KINDS:
                turns = self._rewrite(turns, facts, label, result)
            record_id = "#".join([dim, kind, safe_token(modality), spec.name, safe_token(label_token), file_part])
            record = {"image": image_rel, "conversations": _conversation(turns), "id": record_id,
                      "width": image.width, "height": image.height}
            if self.phi and find_phi(json.dumps(record, ensure_ascii=False), self.phi):
                raise ItemError("deid", f"{file_part}: a record would contain a DICOM identity value; item dropped")
            result.records.append(record)
            result.tags.append({"dataset": spec.name, "modality": modality, "task": TASK_CODES[task], "kind": kind,
                                "department": spec.department or "unspecified", "dim": dim})

    def _rewrite(self, turns, facts, label, result):
        context = {"modality": facts.modality, "body_part": facts.body_part, "plane": facts.plane,
                   "department": facts.department, "label": label}
        out = []
        for question, answer in turns:
            try:
                new = self.rewriter(answer, context)
                answer = new.strip() if isinstance(new, str) and new.strip() else answer
            except Exception as e:  # the hook is optional: keep the templated text
                result.rewrite_failures += 1
                logger.warning("rewriter failed (%s); keeping the templated text", type(e).__name__)
            out.append((question, answer))
        return out


def _conversation(turns: T.Turns) -> list[dict]:
    conversation = []
    for i, (question, answer) in enumerate(turns):
        conversation.append({"from": "human", "value": (f"{IMAGE_TOKEN}\n" if i == 0 else "") + question})
        conversation.append({"from": "gpt", "value": answer})
    return conversation


def _normalised_boxes(boxes, image, fmt) -> dict[str, list[list[float]]]:
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


# --------------------------------------------------------------------------------------------------------------
# the build
# --------------------------------------------------------------------------------------------------------------
def _items(spec: DatasetSpec) -> tuple[list[dict], list[str]]:
    """(annotation rows, files of the image folder that are not images and are skipped)."""
    if spec.task == "caption" and not spec.annotations:
        files, others = (spec.files, []) if spec.files is not None else _discover(spec.image_root)
        return [{"image": f} for f in files], others
    return read_annotations(spec), []


def _item_key(spec: DatasetSpec, row: dict, seed: int, rewriter_id: str) -> str:
    """Resume key: the settings, the annotation row and the size / mtime of the files it names."""
    files = {}
    for column in ("image", "mask"):
        if row.get(column):
            try:
                st = os.stat(os.path.join(spec.image_root, str(row[column])))
                files[column] = [st.st_size, st.st_mtime_ns]
            except OSError:
                files[column] = None
    blob = json.dumps({"v": _WORK_VERSION, "spec": spec.fingerprint(), "row": row, "files": files, "seed": seed,
                       "rewriter": rewriter_id}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def build_dataset(out_dir: str | os.PathLike, *, manifest: str | os.PathLike | None = None,
                  input_dir: str | os.PathLike | None = None, demo: bool = False,
                  datasets: list[DatasetSpec] | None = None, rewriter=None, seed: int = 0,
                  progress: bool | None = None, workers: int | None = None,
                  shard: tuple[int, int] | None = None) -> dict:
    """Convert source datasets into GMAI-VL-format training data under `out_dir` (layout in the module doc).

    Exactly one source: `manifest` (YAML/JSON file, see gmaivl_rt.data.manifest), `input_dir` (unlabelled
    images -> captions), `demo=True` (pydicom's and nibabel's test files) or `datasets` (DatasetSpec list).
    rewriter: None (templates only), a callable fn(text, context) -> str, 'module:function', or an http(s) URL
    of an OpenAI-compatible server. seed: template choice. progress: tqdm bar (default: when stderr is a tty).
    workers: processes converting items (None: every core); the output is byte-identical whatever the count.
    shard: (index, count) converts only that deterministic 1/count of the items (by a stable key of each item),
    to be joined by `merge_shards`.
    Returns the summary (also written to OUT/summary.json) with this run's figures (OUT/build_run.json: seconds,
    new PNG files, resumed items, workers) added. Items already converted by an earlier run with the same settings
    are reused (resume).
    """
    sources = [manifest is not None, input_dir is not None, bool(demo), datasets is not None]
    if sum(sources) != 1:
        raise ValueError("give exactly one of manifest=, input_dir=, demo=True, datasets=")
    if manifest is not None:
        specs = load_manifest(manifest)
    elif input_dir is not None:
        if not os.path.isdir(input_dir):
            raise ManifestError(f"{input_dir}: not a directory")
        specs = [input_dir_dataset(os.fspath(input_dir))]
    elif demo:
        specs = demo_datasets()
    else:
        specs = list(datasets)
    if isinstance(rewriter, str):
        rewriter = openai_rewriter(rewriter) if rewriter.startswith(("http://", "https://")) else \
            load_rewriter(rewriter)
    rewriter_id = "" if rewriter is None else getattr(rewriter, "identity", None) or \
        f"{getattr(rewriter, '__module__', '')}:{getattr(rewriter, '__qualname__', repr(type(rewriter)))}"
    workers = default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shard is not None:
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
            raise ValueError(f"shard {index}/{count}: the index must be in 0..count-1 and count >= 1")

    out_dir = os.fspath(out_dir)
    with _build_log(out_dir):
        started = time.perf_counter()
        partial = _remove_partial_files(out_dir)  # before any worker starts writing
        plan, plan_errors = _plan(specs)
        fingerprint = _build_fingerprint(specs, plan, seed, rewriter_id)
        items = [(s, r) for s, (_, rows) in enumerate(plan) for r in range(len(rows))]
        if shard is not None:
            items = [(s, r) for s, r in items if _shard_of(plan[s][0], plan[s][1][r], shard[1]) == shard[0]]
        logger.info("converting %d items from %d dataset(s) with %d worker(s)%s", len(items), len(specs), workers,
                    f", shard {shard[0]}/{shard[1]}" if shard else "")
        converter = _Converter(ImageStore(os.path.join(out_dir, "images")), seed, rewriter)
        outcomes, run = _convert_items(out_dir, plan, items, converter, rewriter_id, workers, progress)
        if shard is not None:
            atomic_write_json(os.path.join(out_dir, SHARD_FILE), {
                "version": _WORK_VERSION, "build": fingerprint, "shard": list(shard),
                "specs": [asdict(spec) for spec in specs], "plan_errors": plan_errors,
                "items": [[s, r, outcome] for (s, r), outcome in zip(items, outcomes)]})
        summary = _write_outputs(out_dir, specs, plan, plan_errors, items, outcomes)
        run.update(seconds=round(time.perf_counter() - started, 3), workers=workers, partial_files_removed=partial)
        run["images_per_second"] = round(summary["images_converted"] / run["seconds"], 2) if run["seconds"] else None
        atomic_write_json(os.path.join(out_dir, RUN_FILE), run)
        logger.info("wrote %d records (%d images converted, %d new PNGs), %d items skipped with errors, %.1f s",
                    summary["records"], summary["images_converted"], run["new_png_files"], summary["errors"],
                    run["seconds"])
        return {**summary, **run}


SHARD_FILE = "shard.json"
RUN_FILE = "build_run.json"


def default_workers() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def _build_log(out_dir: str):
    os.makedirs(os.path.join(out_dir, "annotations"), exist_ok=True)
    handler = logging.FileHandler(os.path.join(out_dir, "build.log"), encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


def _plan(specs) -> tuple[list[tuple[DatasetSpec, list[dict]]], list[dict]]:
    """Every dataset's items in order, and one error per dataset whose annotations cannot be read."""
    plan, errors = [], []
    for spec in specs:
        try:
            rows, not_images = _items(spec)
        except ManifestError as e:
            errors.append({"dataset": spec.name, "source": os.path.basename(spec.annotations or spec.image_root),
                           "kind": "annotation", "reason": str(e)})
            rows, not_images = [], []
        for name in not_images:  # recorded, so a folder's stray files are not dropped without a word
            errors.append({"dataset": spec.name, "source": name, "kind": "not_an_image",
                           "reason": "not a DICOM, NIfTI, PNG, JPEG, TIFF or BMP file; skipped"})
            logger.warning("skipped %s item %s: %s", spec.name, errors[-1]["source"], errors[-1]["reason"])
        plan.append((spec, rows))
    return plan, errors


def _stable_item_key(spec: DatasetSpec, row: dict) -> str:
    """What an item is, independent of where the files live and of listing order (shard assignment)."""
    return hashlib.sha256(json.dumps([spec.name, row], sort_keys=True, default=str).encode()).hexdigest()


def _shard_of(spec: DatasetSpec, row: dict, count: int) -> int:
    return int(_stable_item_key(spec, row)[:15], 16) % count


def _build_fingerprint(specs, plan, seed: int, rewriter_id: str) -> str:
    """Identifies one build (settings and items): shards of different builds must not be merged."""
    blob = json.dumps({"specs": [spec.fingerprint() for spec in specs], "seed": seed, "rewriter": rewriter_id,
                       "items": [_stable_item_key(spec, row) for spec, rows in plan for row in rows]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# Per-process state of the conversion pool (set once per worker by `_init_worker`).
_WORKER: dict = {}


def _init_worker(out_dir, plan, converter, rewriter_id):
    _WORKER.update(out_dir=out_dir, plan=plan, converter=converter, rewriter_id=rewriter_id)


def _convert_one(item: tuple[int, int]) -> tuple[dict | str, dict]:
    """Convert (or resume) one item. Returns (outcome, counts): outcome is the item's work-file key (its records are
    in OUT/.work/<dataset>/<key>.json) or the error record; counts says what this call did."""
    spec_index, row_index = item
    spec, rows = _WORKER["plan"][spec_index]
    row, converter = rows[row_index], _WORKER["converter"]
    key = _item_key(spec, row, converter.seed, _WORKER["rewriter_id"])
    work_file = os.path.join(_WORKER["out_dir"], ".work", spec.name, f"{key}.json")
    if _load_work(work_file, converter.store.root) is not None:
        return key, {"resumed": 1, "new_png_files": 0}
    written_before = converter.store.written
    try:
        try:
            result = converter.convert(spec, row)
        except (KeyError, ValueError, TypeError, OSError) as e:  # malformed row or file system
            raise ItemError("error", safe_reason(e)) from None
    except ItemError as e:
        error = {"dataset": spec.name, "source": safe_path(str(row.get("image", "")), converter.phi),
                 "kind": e.kind, "reason": scrub(e.reason, converter.phi)}
        logger.warning("skipped %s item %s: %s", spec.name, error["source"], error["reason"])
        return error, {"resumed": 0, "new_png_files": converter.store.written - written_before}
    atomic_write_json(work_file, {"records": result.records, "tags": result.tags, "images": result.images,
                                  "empty_slices_skipped": result.empty_slices_skipped,
                                  "rewrite_failures": result.rewrite_failures}, indent=None)
    return key, {"resumed": 0, "new_png_files": converter.store.written - written_before}


def _convert_items(out_dir, plan, items, converter, rewriter_id, workers, progress) -> tuple[list, dict]:
    """Convert `items` [(spec index, row index)] in a pool of `workers` processes (in this process for 1).
    Returns the outcomes in item order and the run's counts."""
    from tqdm import tqdm

    if progress is None:
        progress = sys.stderr.isatty()
    bar = tqdm(total=len(items), unit="item", desc="data build", disable=not progress)
    run = {"new_png_files": 0, "items_resumed": 0}
    outcomes = []

    def collect(results):
        for outcome, counts in results:
            outcomes.append(outcome)
            run["new_png_files"] += counts["new_png_files"]
            run["items_resumed"] += counts["resumed"]
            bar.update(1)

    workers = min(workers, max(1, len(items)))
    try:
        if workers == 1:
            _init_worker(out_dir, plan, converter, rewriter_id)
            collect(map(_convert_one, items))
        else:
            import concurrent.futures
            import multiprocessing

            # fork shares the plan and the rewriter (which may not pickle) with the workers as they are.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            with concurrent.futures.ProcessPoolExecutor(
                    workers, mp_context=multiprocessing.get_context(method), initializer=_init_worker,
                    initargs=(out_dir, plan, converter, rewriter_id)) as pool:
                # Windows of items, each started largest file first (a volume started last would run alone while
                # the other workers idle) and collected in item order; the next window is queued before the
                # current one is collected, so no worker waits at a window's end.
                windows = [range(a, min(a + SCHEDULE_WINDOW, len(items))) for a in range(0, len(items),
                                                                                        SCHEDULE_WINDOW)]

                def submit(window):
                    order = sorted(window, key=lambda k: -_item_bytes(plan, items[k]))
                    return {k: pool.submit(_convert_one, items[k]) for k in order}

                pending = submit(windows[0]) if windows else {}
                for w in range(len(windows)):
                    following = submit(windows[w + 1]) if w + 1 < len(windows) else {}
                    collect(pending[k].result() for k in windows[w])
                    pending = following
    finally:
        bar.close()
        _WORKER.clear()
    return outcomes, run


SCHEDULE_WINDOW = 1024  # items ordered by size at once (bounded, so millions of items are never all queued)


def _item_bytes(plan, item: tuple[int, int]) -> int:
    """Bytes of the files one item reads (its cost, roughly); 0 where they cannot be seen."""
    spec, rows = plan[item[0]]
    total = 0
    for column in ("image", "mask"):
        name = rows[item[1]].get(column)
        if name:
            try:
                total += os.stat(os.path.join(spec.image_root, str(name))).st_size
            except OSError:
                pass
    return total


def _write_outputs(out_dir, specs, plan, plan_errors, items, outcomes) -> dict:
    """Annotations, meta, errors and summary from the items' outcomes (in item order); written the same way for a
    build, a shard and a merge, so a merge of shards equals the unsharded build byte for byte."""
    from gmaivl_rt.data.summary import make_summary, plot_summary

    work_root = os.path.join(out_dir, ".work")
    errors = list(plan_errors)
    per_spec: dict[int, list] = {}
    tags, counters = [], {"images": 0, "empty_slices_skipped": 0, "rewrite_failures": 0}
    for (spec_index, _), outcome in zip(items, outcomes):
        if isinstance(outcome, dict):
            errors.append(outcome)
            continue
        with open(os.path.join(work_root, plan[spec_index][0].name, f"{outcome}.json"), encoding="utf-8") as f:
            result = json.load(f)
        per_spec.setdefault(spec_index, []).extend(result["records"])
        tags += result["tags"]
        for key in counters:
            counters[key] += result.get(key, 0)
    meta = {}
    for spec_index, (spec, _) in enumerate(plan):
        records = per_spec.get(spec_index, [])
        annotations = f"annotations/{spec.name}.jsonl"
        atomic_write_jsonl(os.path.join(out_dir, annotations), records)
        if records:
            meta[spec.name] = {"image_dir": "images", "annotations": annotations, "sample_ratio": spec.sample_ratio,
                               "length": len(records), "data_augment": bool(spec.data_augment)}
    atomic_write_jsonl(os.path.join(out_dir, "errors.jsonl"), errors)
    atomic_write_json(os.path.join(out_dir, "meta.json"), meta)
    summary = make_summary(tags, errors, specs, counters)
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    plot_summary(summary, os.path.join(out_dir, "summary.png"))
    return summary


def merge_shards(shard_dirs, out_dir: str | os.PathLike) -> dict:
    """Join the outputs of `build_dataset(..., shard=(i, n))` for every i into one dataset under `out_dir`, identical
    to the unsharded build (same annotations in the same order, images stored once, errors and summary merged).
    Refuses shards of different builds (manifest, settings, seed), missing or repeated shard indices."""
    out_dir = os.fspath(out_dir)
    shards = []
    for d in shard_dirs:
        path = os.path.join(os.fspath(d), SHARD_FILE)
        try:
            with open(path, encoding="utf-8") as f:
                shards.append((os.fspath(d), json.load(f)))
        except (OSError, ValueError):
            raise ManifestError(f"{d}: not a shard output (no readable {SHARD_FILE}; build it with --shard I/N)") \
                from None
    if not shards:
        raise ManifestError("merge: no shard folders given")
    first = shards[0][1]
    for d, info in shards[1:]:
        if info["build"] != first["build"]:
            raise ManifestError(f"{d}: a shard of a different build (other manifest, settings or seed) than "
                                f"{shards[0][0]}")
    count = first["shard"][1]
    seen = sorted(info["shard"][0] for _, info in shards)
    if any(info["shard"][1] != count for _, info in shards) or seen != list(range(count)):
        raise ManifestError(f"merge: need shards 0..{count - 1} of {count} exactly once each, got {seen}")
    specs = [DatasetSpec(**s) for s in first["specs"]]
    plan = [(spec, None) for spec in specs]
    entries = sorted(((s, r, outcome, d) for d, info in shards for s, r, outcome in info["items"]),
                     key=lambda e: (e[0], e[1]))
    with _build_log(out_dir):
        for s, _, outcome, d in entries:  # bring each item's work file and images into the merged folder
            if isinstance(outcome, dict):
                continue
            rel = os.path.join(".work", specs[s].name, f"{outcome}.json")
            with open(os.path.join(d, rel), encoding="utf-8") as f:
                data = f.read()
            for record in json.loads(data)["records"]:
                target = os.path.join(out_dir, "images", record["image"])
                if not os.path.exists(target):
                    with open(os.path.join(d, "images", record["image"]), "rb") as f:
                        atomic_write_bytes(target, f.read())
            atomic_write_text(os.path.join(out_dir, rel), data)
        summary = _write_outputs(out_dir, specs, plan, first["plan_errors"], [(s, r) for s, r, _, _ in entries],
                                 [e[2] for e in entries])
        logger.info("merged %d shards: %d records, %d items skipped with errors", count, summary["records"],
                    summary["errors"])
    return summary


def _remove_partial_files(out_dir: str) -> int:
    """Delete the temporary files a killed run left in this build's own folders (by atomic's naming pattern)."""
    removed = remove_partial_files(out_dir, recursive=False)  # meta.json, summary.json, errors.jsonl
    removed += sum(remove_partial_files(os.path.join(out_dir, sub)) for sub in ("images", "annotations", ".work"))
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted run", removed)
    return removed


def _load_work(path: str, image_root: str) -> ItemResult | None:
    """A finished item's result from an earlier run, if complete (its images still exist)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if any(not os.path.exists(os.path.join(image_root, r["image"])) for r in data["records"]):
        return None
    return ItemResult(records=data["records"], tags=data["tags"], images=data["images"],
                      empty_slices_skipped=data["empty_slices_skipped"],
                      rewrite_failures=data.get("rewrite_failures", 0))

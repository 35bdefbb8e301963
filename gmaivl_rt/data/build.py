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
or reordered run writes the same records. Here: the build loop (a pool of worker processes, resume, shards) and
`merge_shards`; one item's conversion is `records.Converter`, where the items come from `sources`, the build
folder's files `outputs`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import asdict

from gmaivl_rt.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from gmaivl_rt.data.deid import safe_path, scrub
from gmaivl_rt.data.image_store import ImageStore
from gmaivl_rt.data.manifest import DatasetSpec, ManifestError, load_manifest
from gmaivl_rt.data.outputs import build_log, load_work, remove_leftovers, save_work, write_outputs
from gmaivl_rt.data.records import Converter, ItemError
from gmaivl_rt.data.rewriter import resolve_rewriter
from gmaivl_rt.data.sources import dataset_items, demo_datasets, input_dir_dataset
from gmaivl_rt.medical.base import safe_reason
from gmaivl_rt.processes import end_with_parent, usable_cores  # pool workers end with the build (kill -9 included)

logger = logging.getLogger("gmaivl_rt.data")
_WORK_VERSION = 1


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
    rewriter, rewriter_id = resolve_rewriter(rewriter)
    workers = usable_cores() if workers is None else int(workers)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if shard is not None:
        index, count = shard
        if not (isinstance(index, int) and isinstance(count, int) and count >= 1 and 0 <= index < count):
            raise ValueError(f"shard {index}/{count}: the index must be in 0..count-1 and count >= 1")

    out_dir = os.fspath(out_dir)
    with build_log(out_dir):
        started = time.perf_counter()
        partial = remove_leftovers(out_dir)  # before any worker starts writing
        plan, plan_errors = _plan(specs)
        fingerprint = _build_fingerprint(specs, plan, seed, rewriter_id)
        items = [(s, r) for s, (_, rows) in enumerate(plan) for r in range(len(rows))]
        if shard is not None:
            items = [(s, r) for s, r in items if _shard_of(plan[s][0], plan[s][1][r], shard[1]) == shard[0]]
        logger.info("converting %d items from %d dataset(s) with %d worker(s)%s", len(items), len(specs), workers,
                    f", shard {shard[0]}/{shard[1]}" if shard else "")
        converter = Converter(ImageStore(os.path.join(out_dir, "images")), seed, rewriter)
        outcomes, run = _convert_items(out_dir, plan, items, converter, rewriter_id, workers, progress)
        if shard is not None:
            atomic_write_json(os.path.join(out_dir, SHARD_FILE), {
                "version": _WORK_VERSION, "build": fingerprint, "shard": list(shard),
                "specs": [asdict(spec) for spec in specs], "plan_errors": plan_errors,
                "items": [[s, r, outcome] for (s, r), outcome in zip(items, outcomes)]})
        summary = write_outputs(out_dir, specs, plan, plan_errors, items, outcomes)
        run.update(seconds=round(time.perf_counter() - started, 3), workers=workers, partial_files_removed=partial)
        run["images_per_second"] = round(summary["images_converted"] / run["seconds"], 2) if run["seconds"] else None
        atomic_write_json(os.path.join(out_dir, RUN_FILE), run)
        logger.info("wrote %d records (%d images converted, %d new PNGs), %d items skipped with errors, %.1f s",
                    summary["records"], summary["images_converted"], run["new_png_files"], summary["errors"],
                    run["seconds"])
        return {**summary, **run}


SHARD_FILE = "shard.json"
RUN_FILE = "build_run.json"



def _plan(specs) -> tuple[list[tuple[DatasetSpec, list[dict]]], list[dict]]:
    """Every dataset's items in order, and one error per dataset whose annotations cannot be read."""
    plan, errors = [], []
    for spec in specs:
        try:
            rows, not_images = dataset_items(spec)
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


def _init_worker(out_dir, plan, converter, rewriter_id, parent_pid=None):
    if parent_pid is not None:
        end_with_parent(parent_pid)
    _WORKER.update(out_dir=out_dir, plan=plan, converter=converter, rewriter_id=rewriter_id)


def _convert_one(item: tuple[int, int]) -> tuple[dict | str, dict]:
    """Convert (or resume) one item. Returns (outcome, counts): outcome is the item's work-file key (its records are
    in OUT/.work/<dataset>/<key>.json) or the error record; counts says what this call did."""
    spec_index, row_index = item
    spec, rows = _WORKER["plan"][spec_index]
    row, converter = rows[row_index], _WORKER["converter"]
    key = _item_key(spec, row, converter.seed, _WORKER["rewriter_id"])
    work_file = os.path.join(_WORKER["out_dir"], ".work", spec.name, f"{key}.json")
    if load_work(work_file, converter.store.root) is not None:
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
    save_work(work_file, result)
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
                    initargs=(out_dir, plan, converter, rewriter_id, os.getpid())) as pool:
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
    with build_log(out_dir):
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
        summary = write_outputs(out_dir, specs, plan, first["plan_errors"], [(s, r) for s, r, _, _ in entries],
                                 [e[2] for e in entries])
        logger.info("merged %d shards: %d records, %d items skipped with errors", count, summary["records"],
                    summary["errors"])
    return summary


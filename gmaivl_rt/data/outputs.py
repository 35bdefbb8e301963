"""The build folder's own files: the run's log, the temporary files a killed run left, the per-item work files a
rerun resumes from (OUT/.work/<dataset>/<key>.json), and the annotations, meta-list, errors and summary written
from the items' outcomes - the same way for a build, a shard and a merge of shards."""
from __future__ import annotations

import contextlib
import json
import logging
import os

from gmaivl_rt.atomic import atomic_write_json, atomic_write_jsonl, remove_partial_files
from gmaivl_rt.data.records import ItemResult

logger = logging.getLogger("gmaivl_rt.data")


@contextlib.contextmanager
def build_log(out_dir: str):
    """Log the block to OUT/build.log (creating OUT and OUT/annotations)."""
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


def remove_leftovers(out_dir: str) -> int:
    """Delete the temporary files a killed run left in this build's own folders (by atomic's naming pattern)."""
    removed = remove_partial_files(out_dir, recursive=False)  # meta.json, summary.json, errors.jsonl
    removed += sum(remove_partial_files(os.path.join(out_dir, sub)) for sub in ("images", "annotations", ".work"))
    if removed:
        logger.info("removed %d partial file(s) left by an interrupted run", removed)
    return removed


def load_work(path: str, image_root: str) -> ItemResult | None:
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


def save_work(path: str, result: ItemResult) -> None:
    """A finished item's result, for `load_work` in a later run."""
    atomic_write_json(path, {"records": result.records, "tags": result.tags, "images": result.images,
                             "empty_slices_skipped": result.empty_slices_skipped,
                             "rewrite_failures": result.rewrite_failures}, indent=None)


def write_outputs(out_dir, specs, plan, plan_errors, items, outcomes) -> dict:
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


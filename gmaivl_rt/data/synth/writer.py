"""`synthesize`: the generated training corpus on disk, as source files plus a manifest that `data build` converts
like any labelled dataset.

    OUT/synth.json                      {"format", "seed", "count"}: what this folder holds (written first)
    OUT/files/<kind>/<index>.dcm|.nii   the scans (DICOM CT, MR, CR/DX, US; NIfTI MR volumes)
    OUT/annotations/<dataset>.jsonl     one row per question (task vqa) or per findings caption (task report)
    OUT/labels.jsonl                    the ground truth per scene (no identity)
    OUT/manifest.yaml                   the datasets, for `gmaivl-rt data build --manifest OUT/manifest.yaml`

Every file is written atomically and depends only on (seed, count), so a run killed at any point and rerun with
`resume=True` ends byte-identical to an uninterrupted one; the manifest is written last (a folder with one is
complete).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from gmaivl_rt.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text, remove_partial_files
from gmaivl_rt.data.synth.questions import caption, training_conversations
from gmaivl_rt.data.synth.render import render_file, slice_index
from gmaivl_rt.data.synth.scenes import KINDS, Scene, draw_scene, scene_rng
from gmaivl_rt.processes import ordered_map, usable_cores

FORMAT = "gmaivl-rt synth 1"
SETTINGS_FILE = "synth.json"
MANIFEST_FILE = "manifest.yaml"
MAX_COUNT = 1_000_000


class SynthError(ValueError):
    """Bad arguments or an output folder that cannot be used; the message names it and the problem."""


def check_count(count, role: str = "count") -> int:
    if isinstance(count, bool) or not isinstance(count, int):
        raise SynthError(f"{role} must be a whole number, got {count!r}")
    if not 1 <= count <= MAX_COUNT:
        raise SynthError(f"{role} must be between 1 and {MAX_COUNT}, got {count}")
    return count


def check_workers(workers, role: str = "workers") -> int:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise SynthError(f"{role} must be a whole number >= 1, got {workers!r}")
    return workers


def prepare_output(out: Path, settings: dict, resume: bool, overwrite: bool) -> None:
    """Check the output folder before anything is written: it must be new or empty, or (resume) hold a run with
    the same settings, or (overwrite) hold an earlier synth output, which is then removed. Creates it."""
    if resume and overwrite:
        raise SynthError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise SynthError(f"output folder (--out) {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        previous = _read_settings(out)
        if resume:
            if previous is None:
                raise SynthError(f"output folder (--out) {out}: not a synth output (no {SETTINGS_FILE}); nothing "
                                 "to resume")
            if previous != settings:
                raise SynthError(f"output folder (--out) {out}: holds a run with other settings "
                                 f"(seed {previous.get('seed')}, count {previous.get('count')}); use --overwrite")
        elif overwrite:
            if previous is None:  # never delete a folder this command did not write
                raise SynthError(f"output folder (--out) {out}: not empty and not a synth output; refusing to "
                                 "overwrite it")
            shutil.rmtree(out)
        else:
            raise SynthError(f"output folder (--out) {out}: exists and is not empty; pass --resume to continue "
                             "that run or --overwrite to replace it")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-probe"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise SynthError(f"output folder (--out) {out}: cannot be written ({e.strerror})") from None


def _read_settings(out: Path) -> dict | None:
    try:
        data = json.loads((out / SETTINGS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("format") == FORMAT else None


def scene_file(scene: Scene, suffix: str) -> str:
    """The file of a scene, relative to OUT/files (named by index only: no identity in a name)."""
    return f"{scene.kind}/{scene.index:06d}{suffix}"


SUFFIX = {kind: (".nii" if kind == "nifti" else ".dcm") for kind in KINDS}


def _scan_file(scene: Scene) -> str:
    return scene_file(scene, SUFFIX[scene.kind])


def dataset_name(scene: Scene, task: str) -> str:
    kind = f"mri_volume_{scene.plane}" if scene.kind == "nifti" else scene.kind
    return f"synth_{kind}_{task}"


WRITE_CHUNK = 32  # scans per task of the rendering pool


def _write_scans(task: tuple[Path, int, list[int]]) -> int:
    """Render and write (atomically) the scans of one task: (out, seed, scene indices). Returns their number."""
    out, seed, indices = task
    for index in indices:
        scene = draw_scene(seed, index)
        _, data = render_file(scene)
        atomic_write_bytes(out / "files" / _scan_file(scene), data)
    return len(indices)


def synthesize(out, count: int, seed: int = 0, *, resume: bool = False, overwrite: bool = False,
               progress: bool = False, workers: int | None = None) -> dict:
    """Write `count` scenes of the corpus seeded `seed` into `out` (layout in the module doc), the scans rendered in
    `workers` processes (default: every core; the files are the same whatever the number). Returns
    {"out", "scenes", "files_written", "files_resumed", "records" (questions + captions), "manifest"}."""
    count = check_count(count)
    workers = check_workers(usable_cores() if workers is None else workers)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise SynthError(f"seed must be a whole number, got {seed!r}")
    out = Path(out)
    settings = {"format": FORMAT, "seed": seed, "count": count}
    prepare_output(out, settings, resume, overwrite)
    remove_partial_files(out)
    if not (out / SETTINGS_FILE).exists():
        atomic_write_json(out / SETTINGS_FILE, settings)
    from tqdm import tqdm

    # a scan that exists was written whole (atomically) by an earlier run with the same settings
    scenes = [draw_scene(seed, index) for index in range(count)]
    missing = [s.index for s in scenes if not (out / "files" / _scan_file(s)).exists()]
    tasks = [(out, seed, missing[a:a + WRITE_CHUNK]) for a in range(0, len(missing), WRITE_CHUNK)]
    with tqdm(total=len(missing), desc="data synth", unit="scan", disable=not progress) as bar:
        for written in ordered_map(_write_scans, tasks, workers):
            bar.update(written)

    annotations: dict[str, list[dict]] = {}
    specs: dict[str, dict] = {}
    labels = []
    for scene in scenes:
        relative = _scan_file(scene)
        row = {"image": relative}
        if scene.kind == "nifti":
            row["frame"] = slice_index(scene)
        rng = scene_rng(seed, scene.index, "questions")
        for task in ("report", "vqa"):
            name = dataset_name(scene, task)
            specs.setdefault(name, _spec(scene, name, task))
        annotations.setdefault(dataset_name(scene, "report"), []).append({**row, "report": caption(scene, rng)})
        rows = annotations.setdefault(dataset_name(scene, "vqa"), [])
        for dialogue in training_conversations(scene, rng):
            qtypes, texts, answers = (list(column) for column in zip(*dialogue))
            rows.append({**row, "question": texts, "answer": answers, "question_type": qtypes})
        labels.append({"index": scene.index, "file": relative, "kind": scene.kind, "modality": scene.modality,
                       "region": scene.region, "plane": scene.plane, "count": scene.count, "side": scene.side,
                       "size": scene.size, **({"frame": row["frame"]} if "frame" in row else {})})
    names = sorted(specs)
    for name in names:
        atomic_write_text(out / "annotations" / f"{name}.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in annotations[name]))
    atomic_write_text(out / "labels.jsonl", "".join(json.dumps(r, sort_keys=True) + "\n" for r in labels))
    import yaml

    manifest = {"datasets": [specs[name] for name in names]}
    atomic_write_text(out / MANIFEST_FILE, "# written by `gmaivl-rt data synth`; convert with `gmaivl-rt data "
                                           "build --manifest` on this file\n" + yaml.safe_dump(manifest, sort_keys=False))
    return {"out": str(out), "scenes": count, "files_written": len(missing), "files_resumed": count - len(missing),
            "records": sum(len(rows) for rows in annotations.values()), "manifest": str(out / MANIFEST_FILE)}


def task_subset(corpus, out, question_types, *, volumes: bool = True, captions: bool = True) -> Path:
    """A manifest over a written corpus (`synthesize`) that keeps only the dialogue turns of `question_types`
    (dialogues left empty are dropped), the findings captions when `captions`, and the NIfTI volumes when `volumes`;
    the files stay where they are. Writes OUT/manifest.yaml and OUT/annotations/*.jsonl; returns the manifest path.
    For small tasks (the convergence test, the stage ablation) built with `data build --manifest` like any corpus."""
    import yaml

    corpus, out, keep = Path(corpus), Path(out), set(question_types)
    manifest = yaml.safe_load((corpus / MANIFEST_FILE).read_text())
    kept = []
    for spec in manifest["datasets"]:
        if (not volumes and "mri_volume" in spec["name"]) or (not captions and spec["task"] == "report"):
            continue
        rows = [json.loads(line) for line in (corpus / spec["annotations"]).read_text().splitlines()]
        if spec["task"] == "vqa":
            rows = [{**r, **{k: [v for v, t in zip(r[k], r["question_type"]) if t in keep]
                             for k in ("question", "answer", "question_type")}} for r in rows]
            rows = [r for r in rows if r["question"]]
        if not rows:
            continue
        atomic_write_text(out / "annotations" / f"{spec['name']}.jsonl",
                          "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        kept.append({**spec, "image_root": str((corpus / spec["image_root"]).resolve()),
                     "annotations": f"annotations/{spec['name']}.jsonl"})
    atomic_write_text(out / MANIFEST_FILE, yaml.safe_dump({"datasets": kept}, sort_keys=False))
    return out / MANIFEST_FILE


def _spec(scene: Scene, name: str, task: str) -> dict:
    """A manifest dataset entry (gmaivl_rt.data.manifest) for one kind (and plane) and task."""
    spec = {"name": name, "task": task, "image_root": "files", "annotations": f"annotations/{name}.jsonl",
            "department": "radiology"}
    if scene.kind == "nifti":
        spec.update(modality="MRI", planes=[scene.plane])
    return spec


__all__ = [
    "SynthError",
    "check_count",
    "check_workers",
    "dataset_name",
    "prepare_output",
    "scene_file",
    "synthesize",
    "task_subset",
]

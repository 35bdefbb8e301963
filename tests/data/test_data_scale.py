"""Data builds at scale: a process pool and shards give exactly the output of one process.

The reference is the plain `--workers 1` build of the same manifest (every task, good and bad items: see
tests/support/manifest_sources.py); outputs are compared byte for byte, file by file."""
import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from manifest_sources import make_sources

from gmaivl_rt.data.build import build_dataset, merge_shards
from gmaivl_rt.data.manifest import ManifestError

# What a build writes that describes the run, not the dataset (timings, resumed counts).
RUN_ONLY = {"build.log", "build_run.json", "shard.json"}


def dataset_files(out) -> dict:
    """{relative path: bytes} of everything a build wrote except run-only files and hidden temporaries."""
    files = {}
    for root, dirs, names in os.walk(out):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), out)
            if rel in RUN_ONLY or name.startswith("."):
                continue
            with open(os.path.join(root, name), "rb") as f:
                files[rel] = f.read()
    return files


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale_sources")
    manifest, _ = make_sources(root)
    reference = root / "reference"
    summary = build_dataset(reference, manifest=manifest, seed=3, progress=False, workers=1)
    return root, manifest, reference, summary


def test_workers_give_byte_identical_output(sources, tmp_path):
    """Mutant: collecting results as they complete (imap_unordered / as_completed) reorders annotations; counting
    new PNGs in summary.json makes it differ by worker count. Both fail here."""
    _, manifest, reference, summary = sources
    assert summary["records"] > 0 and summary["errors"] > 0  # good and bad items both present
    expected = dataset_files(reference)
    assert any(k.startswith("images") for k in expected) and "summary.json" in expected
    parallel = build_dataset(tmp_path / "w3", manifest=manifest, seed=3, progress=False, workers=3)
    assert parallel["workers"] == 3 and parallel["records"] == summary["records"]
    assert dataset_files(tmp_path / "w3") == expected
    run = json.loads((tmp_path / "w3" / "build_run.json").read_text())
    assert run["new_png_files"] == sum(1 for k in expected if k.startswith("images"))


def test_shards_merge_into_the_unsharded_build(sources, tmp_path):
    _, manifest, reference, summary = sources
    shard_dirs = [tmp_path / f"shard{i}" for i in range(3)]
    sizes = [build_dataset(d, manifest=manifest, seed=3, progress=False, workers=1, shard=(i, 3))["records"]
             for i, d in enumerate(shard_dirs)]
    assert sum(sizes) == summary["records"] and sum(1 for n in sizes if n) >= 2  # the work really was split
    merged = merge_shards(reversed(shard_dirs), tmp_path / "merged")  # order of the folders does not matter
    assert merged["records"] == summary["records"]
    assert dataset_files(tmp_path / "merged") == dataset_files(reference)


def test_shard_assignment_is_stable_under_reordering(sources, tmp_path):
    """Shards are chosen by what an item is, not by its position: reversing the annotation rows moves no item."""
    root, manifest, _, _ = sources
    spec = yaml.safe_load(manifest.read_text())
    lines = (root / "rep.jsonl").read_text().splitlines() + (root / "vqa.jsonl").read_text().splitlines()
    (root / "both.jsonl").write_text("\n".join(lines) + "\n")
    (root / "both_reversed.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    picked = []
    for name in ("both.jsonl", "both_reversed.jsonl"):
        m = root / f"m_{name}.yaml"
        m.write_text(yaml.safe_dump({"datasets": [{"name": "mixed", "task": "vqa", "image_root": "images",
                                                   "annotations": name}]}))
        out = tmp_path / name
        build_dataset(out, manifest=m, seed=3, progress=False, shard=(0, 2))
        items = json.loads((out / "shard.json").read_text())["items"]
        picked.append(len(items))
    assert spec["datasets"] and picked[0] == picked[1]


def test_merge_refuses_mixed_or_incomplete_shards(sources, tmp_path):
    _, manifest, _, _ = sources
    a0 = tmp_path / "a0"
    build_dataset(a0, manifest=manifest, seed=3, progress=False, shard=(0, 2))
    b1 = tmp_path / "b1"
    build_dataset(b1, manifest=manifest, seed=4, progress=False, shard=(1, 2))  # another seed: another build
    with pytest.raises(ManifestError, match="different build"):
        merge_shards([a0, b1], tmp_path / "m1")
    with pytest.raises(ManifestError, match=r"shards 0\.\.1 of 2"):
        merge_shards([a0], tmp_path / "m2")
    with pytest.raises(ManifestError, match="not a shard output"):
        merge_shards([a0, tmp_path], tmp_path / "m3")
    with pytest.raises(ValueError, match="shard 2/2"):
        build_dataset(tmp_path / "x", manifest=manifest, shard=(2, 2))
    r = subprocess.run([sys.executable, "-m", "gmaivl_rt.cli", "data", "build", "--manifest", str(manifest),
                        "--out", str(tmp_path / "y"), "--shard", "3/3"], capture_output=True, text=True)
    assert r.returncode == 2 and "0 <= I < N" in r.stderr


SLOW_REWRITER = '''
import time


def rewrite(text, context):
    time.sleep(0.15)
    return text + " (checked)"
'''


def test_kill_during_a_parallel_build_resumes_to_the_uninterrupted_output(sources, tmp_path, start_child, cli):
    """kill -9 of the whole process group (the build and its workers) mid-run; the rerun redoes what was cut."""
    _, manifest, _, _ = sources
    (tmp_path / "slowrw.py").write_text(SLOW_REWRITER)
    env = {**os.environ, "PYTHONPATH": str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", "")}

    def command(out, workers):
        return [sys.executable, "-m", "gmaivl_rt.cli", "data", "build", "--manifest", str(manifest), "--out",
                str(out), "--seed", "3", "--rewriter", "slowrw:rewrite", "--workers", str(workers), "--no-progress"]

    killed = tmp_path / "killed"
    child = start_child(command(killed, 2), command=[], env=env, start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and child.alive():
        # finished work files only: a worker's partial ".<name>.<8 chars>.tmp" is not a resumable item
        if sum(not f.startswith(".") for _, _, files in os.walk(killed / ".work") for f in files) >= 3:
            break
        time.sleep(0.05)
    child.kill(group=True)  # fails with the child's exit code and stderr if the build ended before the kill
    assert not (killed / "summary.json").exists()
    cli(command(killed, 2)[3:], env=env, timeout=300)
    run = json.loads((killed / "build_run.json").read_text())
    assert run["items_resumed"] >= 3
    reference = tmp_path / "uninterrupted"
    cli(command(reference, 1)[3:], env=env, timeout=300)
    assert dataset_files(killed) == dataset_files(reference)


def test_racing_writers_of_one_image_count_it_once(tmp_path):
    """Parallel workers may convert the same picture: the store's file is created once and counted once.
    Mutant: creating with os.replace (last writer wins) counts it twice."""
    from concurrent.futures import ProcessPoolExecutor

    from gmaivl_rt.atomic import PARTIAL_FILE, atomic_create_bytes

    target = tmp_path / "ab" / "same.png"
    with ProcessPoolExecutor(4) as pool:
        created = list(pool.map(atomic_create_bytes, [target] * 16, [bytes([i]) * 64 for i in range(16)]))
    assert sum(created) == 1
    assert target.read_bytes() == bytes([created.index(True)]) * 64
    assert not [p for p in target.parent.iterdir() if PARTIAL_FILE.fullmatch(p.name)]

"""A data build killed (SIGKILL) at many points resumes to the same output: the rerun removes the partial
`.*.tmp` files the killed run left (only those, and says how many), every annotation's image exists, and the
annotations are byte-identical to an uninterrupted build's.

The kill points are the build's file moves (os.replace, the last step of every atomic write): the child process
kills itself just before or just after the N-th one, so each point is hit exactly, without timing luck."""
import multiprocessing
import os
import signal
import shutil

import pytest
from dicom_files import DICOM_DIR
from PIL import Image

from gmaivl_rt.data.build import build_dataset

# One process, so the N-th file move is the same one in every run (worker processes would each count their own;
# --workers N gives the same output whatever N, tested in test_data_build.py).
WORKERS = 1


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("scans")
    for i in range(4):
        Image.new("RGB", (24 + i, 20), (40 * i, 90, 200 - 30 * i)).save(src / f"photo{i}.png")
    for name in ("MR_small.dcm", "CT_small.dcm"):
        shutil.copy(os.path.join(DICOM_DIR, name), src / name)
    (src / "bad.png").write_bytes(b"not an image")
    return src


def _count_replaces(out, src, monkeypatch) -> int:
    calls = [0]
    real = os.replace

    def counting(a, b):
        calls[0] += 1
        real(a, b)

    monkeypatch.setattr(os, "replace", counting)
    build_dataset(out, input_dir=src, progress=False, workers=WORKERS)
    monkeypatch.setattr(os, "replace", real)
    return calls[0]


def _build_and_die(out, src, kill_at, before):
    """Child process: build, SIGKILL itself just before / after the kill_at-th os.replace."""
    real, calls = os.replace, [0]

    def replace(a, b):
        calls[0] += 1
        if calls[0] == kill_at and before:
            os.kill(os.getpid(), signal.SIGKILL)
        real(a, b)
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace
    build_dataset(out, input_dir=src, progress=False, workers=WORKERS)
    os._exit(0)


def _partial_files(root):
    return sorted(p for p in root.rglob(".*.tmp") if p.is_file())


def _annotations(out):
    return {p.name: p.read_bytes() for p in sorted((out / "annotations").glob("*.jsonl"))}


def test_build_killed_at_many_points_resumes_to_the_same_output(tmp_path, source, monkeypatch):
    reference = tmp_path / "reference"
    moves = _count_replaces(reference, source, monkeypatch)
    assert moves > 10
    expected = _annotations(reference)
    points = sorted({1, 2, moves // 3, moves // 2, moves - 3, moves - 1, moves})
    context = multiprocessing.get_context("fork")
    partial_seen = 0
    for i, kill_at in enumerate(points):
        out = tmp_path / f"killed-{kill_at}"
        child = context.Process(target=_build_and_die, args=(out, source, kill_at, i % 2 == 0))
        child.start()
        child.join(timeout=120)
        assert child.exitcode == -signal.SIGKILL, (kill_at, child.exitcode)
        left = _partial_files(out)
        partial_seen += len(left)
        (out / "images" / ".keep.me.tmp").parent.mkdir(parents=True, exist_ok=True)
        (out / "images" / ".keep.me.tmp").write_text("not the build's: the name does not match its pattern")

        summary = build_dataset(out, input_dir=source, progress=False, workers=WORKERS)
        assert summary["partial_files_removed"] == len(left), kill_at
        assert _partial_files(out) == [out / "images" / ".keep.me.tmp"]
        assert _annotations(out) == expected, kill_at
        for line in b"".join(expected.values()).decode().splitlines():
            image = line.split('"image": "')[1].split('"')[0]
            assert (out / "images" / image).is_file()
    assert partial_seen >= len(points) // 2  # the 'before' kills each left a partial file

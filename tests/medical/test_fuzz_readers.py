"""Fuzzing the image readers: mutated real DICOM, PNG, JPEG and NIfTI files (bit flips, truncation, huge length
fields, random data elements and header bytes, gzip bombs) into `read_medical_image`. Each format runs in its own
process (tests/medical/fuzz_worker.py) with a time bound per call and a memory bound for the process; the only errors
allowed are MedicalImageError / LimitError, and nothing may be written outside the work folder.

CI: FUZZ_EXAMPLES (default 200) examples per format, derandomized (the same inputs every run). `make fuzz` runs
many more with shrinking; its findings land in the work folder's findings/ and, once fixed, in
tests/medical/fuzz_regressions/, which every run replays first."""
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

HERE = Path(__file__).parent
REGRESSIONS = HERE / "fuzz_regressions"
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "200"))
DICOM_SEEDS = ("MR_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_RLE.dcm", "SC_rgb_jpeg_dcmtk.dcm",
               "MR_small_jp2klossless.dcm", "JPGExtended.dcm")


def _nifti_bytes(shape=(8, 8, 6), zooms=(1.0, 1.0, 2.5)) -> bytes:
    volume = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    image = nib.Nifti1Image(volume, np.diag([*zooms, 1.0]))
    image.header.set_zooms(zooms)
    return image.to_bytes()


def _gzip_bomb() -> bytes:
    """A .nii.gz whose header promises a 4096 x 4096 x 512 float32 volume (32 GiB) over 64 MiB of zeros that
    compress to ~64 KiB."""
    header = nib.Nifti1Header()
    header.set_data_shape((4096, 4096, 512))
    header.set_data_dtype(np.float32)
    raw = io.BytesIO()
    header.write_to(raw)
    raw.write(b"\0" * (352 - raw.tell()))
    return gzip.compress(raw.getvalue() + b"\0" * (64 << 20), compresslevel=9)


def _png(mode, size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    values = np.linspace(0, 60000 if mode == "I;16" else 255, size[0] * size[1]).reshape(size[::-1])
    image = Image.fromarray(values.astype(np.uint16 if mode == "I;16" else np.uint8))
    (image if mode != "RGB" else image.convert("RGB")).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _seeds(fmt, folder: Path) -> list[Path]:
    if fmt == "dicom":
        return [Path(p) for p in (get_testdata_file(n, download=False) for n in DICOM_SEEDS) if p]
    blobs = {"png": [_png("RGB"), _png("I;16")], "jpeg": [_jpeg()], "nifti": [_nifti_bytes()],
             "nifti-gz": [gzip.compress(_nifti_bytes()), _gzip_bomb()]}[fmt]
    folder.mkdir()
    for i, blob in enumerate(blobs):
        (folder / f"seed{i}").write_bytes(blob)
    return sorted(folder.iterdir())


def _tree(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*")}


@pytest.mark.parametrize("fmt", ["dicom", "png", "jpeg", "nifti", "nifti-gz"])
def test_mutated_files_only_ever_fail_cleanly(fmt, tmp_path):
    seeds = _seeds(fmt, tmp_path / "seeds")
    seed_digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in seeds}
    work = tmp_path / "work"
    work.mkdir()
    regressions = sorted(str(p) for p in REGRESSIONS.glob(f"{fmt}-*"))
    before = _tree(tmp_path)
    env = {**os.environ, "TMPDIR": str(work), "HOME": str(work), "FUZZ_REGRESSIONS": os.pathsep.join(regressions),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, str(HERE / "fuzz_worker.py"), fmt, str(work), str(EXAMPLES),
                             *map(str, seeds)], cwd=work, env=env, capture_output=True, text=True,
                            timeout=max(300, EXAMPLES * 2))
    report = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else result.stderr[-2000:]
    assert result.returncode == 0, report
    stats = json.loads(report)
    print(f"\nfuzz {fmt}: {stats}")
    assert stats["examples"] >= min(EXAMPLES, 100) and stats["refused"] > 0
    # Nothing written outside the work folder, and the reader left nothing inside it but our input file.
    after = _tree(tmp_path)
    assert {k for k in after if not k.startswith("work")} == {k for k in before if not k.startswith("work")}
    allowed = {".hypothesis"} | {"input" + s for s in (".dcm", ".png", ".jpg", ".nii", ".nii.gz")}
    assert {p.name for p in work.iterdir()} <= allowed
    assert all(hashlib.sha256(p.read_bytes()).hexdigest() == d for p, d in seed_digests.items())

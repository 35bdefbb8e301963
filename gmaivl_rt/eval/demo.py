"""The demo's held-out benchmark: plane and modality questions (options A-D) in VLMEvalKit TSV form, about
pictures from files that pydicom and nibabel ship but the demo's training data (`gmaivl_rt.data.sources.
demo_datasets`) does not use, so `make demo` can end with the trained model's accuracy beside chance."""
from __future__ import annotations

import base64
import csv
import io
import os
import random
from pathlib import Path

PLANE_QUESTION = "Which anatomical plane does this image show?"
MODALITY_QUESTION = "What imaging modality was used to acquire this image?"
PLANES = ["axial", "coronal", "sagittal", "oblique"]
MODALITIES = ["CT", "MRI", "X-ray", "ultrasound", "secondary capture", "radiotherapy dose map", "segmentation"]
HELD_OUT_NIFTI = ("reoriented_anat_moved.nii", "resampled_anat_moved.nii", "standard.nii.gz")
SLICE_FRACTIONS = (0.3, 0.5, 0.7)
MIN_SIDE = 8  # pictures smaller than this on a side say nothing about plane or modality


def held_out_pictures() -> list[dict]:
    """[{"source", "kind", "pixels", "plane", "modality"}] from the shipped files the demo data leaves out."""
    import nibabel.testing
    import pydicom.data

    from gmaivl_rt.data.sources import DEMO_DICOM_FILES, DEMO_NIFTI_FILES
    from gmaivl_rt.medical.base import MedicalImageError, modality_name
    from gmaivl_rt.medical.reader import count_images, read_medical_image

    pictures = []
    nifti_root = Path(nibabel.testing.data_path)
    for name in HELD_OUT_NIFTI:
        if name in DEMO_NIFTI_FILES or not (nifti_root / name).is_file():
            continue
        for plane in ("axial", "coronal", "sagittal"):
            count = count_images(nifti_root / name, plane=plane)
            for index in sorted({min(count - 1, int(f * count)) for f in SLICE_FRACTIONS}):
                image = read_medical_image(nifti_root / name, plane=plane, slice_index=index)
                pictures.append({"source": "nifti", "pixels": image.pixels, "plane": plane, "modality": "MRI"})
    dicom_root = Path(pydicom.data.__file__).parent / "test_files"
    for name in sorted(os.listdir(dicom_root)):
        if not name.endswith(".dcm") or name in DEMO_DICOM_FILES:
            continue
        try:
            image = read_medical_image(dicom_root / name)
        except MedicalImageError:  # not an image, or needs a codec that is not installed
            continue
        modality = modality_name(image.modality) if image.modality else None
        if modality in MODALITIES:
            pictures.append({"source": "dicom", "pixels": image.pixels, "plane": image.orientation,
                             "modality": modality})
    return [p for p in pictures if min(p["pixels"].shape[:2]) >= MIN_SIDE]


def _png_base64(pixels) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _options(rng: random.Random, answer: str, pool: list[str]) -> tuple[list[str], str]:
    choices = [answer] + rng.sample([p for p in pool if p != answer], 3)
    rng.shuffle(choices)
    return choices, "ABCD"[choices.index(answer)]


def build_demo_benchmark(path, seed: int = 0) -> Path:
    """Write the held-out benchmark as a VLMEvalKit TSV at `path` (atomically). A picture asked about twice keeps
    its image in the first row; the second row's `image` is the first row's index (VLMEvalKit's reuse rule)."""
    from gmaivl_rt.atomic import atomic_write_text

    rng = random.Random(seed)
    rows = []
    for picture in held_out_pictures():
        image = _png_base64(picture["pixels"])
        questions = [("modality", MODALITY_QUESTION, picture["modality"], MODALITIES)]
        if picture["plane"] in PLANES[:3]:
            questions.insert(0, ("plane", PLANE_QUESTION, picture["plane"], PLANES))
        first_index = None
        for category, question, answer, pool in questions:
            choices, letter = _options(rng, answer, pool)
            index = len(rows)
            rows.append({"index": index, "image": image if first_index is None else str(first_index),
                         "question": question, **dict(zip("ABCD", choices)), "answer": letter,
                         "category": category, "l2-category": picture["source"], "split": "dev"})
            first_index = index if first_index is None else first_index
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
    return Path(path)


def run_eval_demo(model_dir, out, backend: str = "torch", batch_size: int = 8, progress: bool = True,
                  **backend_kwargs) -> dict:
    """Build the held-out benchmark in `out`, evaluate the model on it there, print accuracy beside chance.
    backend_kwargs go to `gmaivl_rt.load` (torch: device, dtype; onnx/tensorrt: device)."""
    from gmaivl_rt.eval.report import summary_line
    from gmaivl_rt.eval.run import PREDICTIONS, evaluate

    out = Path(out)
    data = build_demo_benchmark(out / "demo_benchmark.tsv")
    if (out / PREDICTIONS).exists():  # a fresh demo run each time
        (out / PREDICTIONS).unlink()
    scores = evaluate(model_dir, data, out, backend=backend, batch_size=batch_size, progress=progress,
                      **backend_kwargs)
    print(f"held-out benchmark ({scores['count']} questions, {data}): {summary_line(scores)}")
    for category, figures in scores["by"].get("category", {}).items():
        print(f"  {category:9s} accuracy {figures['accuracy']:.1%} of {figures['count']}")
    return scores

"""The demo's held-out benchmarks.

`run_heldout_eval` (what `make demo` and `gmaivl-rt eval --demo` run): generated scenes of a seed no training
corpus uses (`gmaivl_rt.data.synth`), as a VLMEvalKit TSV and a SLAKE JSON, scored for the model and for its
image-blind control (the same questions with every image replaced by one grey picture), with a picture report.
`build_demo_benchmark`: plane and modality questions about files that pydicom and nibabel ship but the demo's
training data does not use."""
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


def run_shipped_files_eval(model_dir, out, backend: str = "torch", batch_size: int = 8, progress: bool = True,
                           **backend_kwargs) -> dict:
    """Build the shipped-files benchmark in `out`, evaluate the model on it there, print accuracy beside chance.
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


# ------------------------------------------------------------------------------------------------ generated scenes
HELD_OUT_SEED = 1_000_003   # no training corpus uses it (the demo's corpus is seed 0)
HELD_OUT_SCENES = 60


def run_heldout_eval(model_dir, out, scenes: int = HELD_OUT_SCENES, seed: int = HELD_OUT_SEED,
                     backend: str = "torch", batch_size: int = 8, progress: bool = True, slake_limit: int | None = None,
                     **backend_kwargs) -> dict:
    """Write the held-out files for `scenes` scenes of `seed` into `out` (heldout.tsv, heldout_slake/), score the
    model on the TSV (out/scores.json, by question type under `by.category`), on its image-blind copy
    (out/blind/scores.json) and on the SLAKE JSON (out/slake/scores.json, its first `slake_limit` questions), and
    draw out/report.png (held-out images with question, answer, reference and a mark).
    Returns {"real", "blind", "slake"} score dicts."""
    from gmaivl_rt.data.synth import constant_image_tsv, write_benchmark
    from gmaivl_rt.eval.report import summary_line
    from gmaivl_rt.eval.run import PREDICTIONS, evaluate

    out = Path(out)
    files = write_benchmark(out, scenes, seed)
    blind_tsv = constant_image_tsv(files["tsv"], out / "blind" / "heldout_blind.tsv")
    runs = {"real": (files["tsv"], out, None), "blind": (blind_tsv, out / "blind", None),
            "slake": (files["slake"], out / "slake", slake_limit)}
    scores = {}
    for name, (data, folder, limit) in runs.items():
        if (Path(folder) / PREDICTIONS).exists():  # a fresh demo run each time
            (Path(folder) / PREDICTIONS).unlink()
        scores[name] = evaluate(model_dir, data, folder, backend=backend, batch_size=batch_size, limit=limit,
                                progress=progress, **backend_kwargs)
    print(f"held-out scenes (seed {seed}, {out / 'heldout.tsv'}): {summary_line(scores['real'])}")
    print(f"image-blind control (one grey image for all):        {summary_line(scores['blind'])}")
    real_by, blind_by = (scores[k]["by"].get("category", {}) for k in ("real", "blind"))
    for category, figures in real_by.items():
        blind = blind_by.get(category, {}).get("accuracy", float("nan"))
        print(f"  {category:9s} accuracy {figures['accuracy']:6.1%} of {figures['count']:3d}   blind {blind:6.1%}")
    print(f"SLAKE-style closed/open questions: {summary_line(scores['slake'])}")
    write_picture_report(out, out / "report.png")
    return scores


def write_picture_report(eval_dir, path, count: int = 16) -> Path:
    """A grid of the first `count` held-out TSV questions: image, question, the model's answer, the reference and
    a mark (right / wrong), from eval_dir/heldout.tsv and eval_dir/predictions.jsonl. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from gmaivl_rt.atomic import atomic_path
    from gmaivl_rt.eval.readers import read_benchmark
    from gmaivl_rt.eval.run import read_predictions

    eval_dir = Path(eval_dir)
    items = read_benchmark(eval_dir / "heldout.tsv").items
    predictions = read_predictions(eval_dir / "predictions.jsonl")
    # one question per scene first (distinct images), then the rest
    seen, order = set(), []
    for item in items:
        if item.images[0].data not in seen:
            seen.add(item.images[0].data)
            order.append(item)
    shown = [i for i in order if i.index in predictions][:count]
    cols = 4
    rows = max(1, -(-len(shown) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, item in zip(axes.ravel(), shown):
        row = predictions[item.index]
        ax.imshow(Image.open(io.BytesIO(base64.b64decode(item.images[0].data))).convert("RGB"))
        mark, colour = ("right", "#2a7d2e") if row["correct"] else ("wrong", "#b22222")
        ax.set_title(f"{item.question[:40]}\nanswer: {str(row['prediction'])[:28]}\n"
                     f"reference: {item.answer}. {item.options[item.answer]}  [{mark}]", fontsize=7, color=colour)
    fig.suptitle("held-out scenes: the stage III model's answers", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)
    return path


def run_eval_demo(model_dir, out, backend: str = "torch", batch_size: int = 8, progress: bool = True,
                  **backend_kwargs) -> dict:
    """`gmaivl-rt eval --demo`: the held-out generated scenes (`run_heldout_eval`); returns the real scores."""
    return run_heldout_eval(model_dir, out, backend=backend, batch_size=batch_size, progress=progress,
                            **backend_kwargs)["real"]

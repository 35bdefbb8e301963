"""Held-out benchmark files from scenes of another seed, in the formats `gmaivl-rt eval` reads:

    OUT/heldout.tsv                 VLMEvalKit MCQ TSV: index, image (base64 PNG; a scene's later rows reuse its
                                    first row's image by index), question, A.., answer (letter), category (question
                                    type), l2-category (file kind), modality, department, split
    OUT/heldout_slake/heldout.json  SLAKE-style JSON: img_name, question, answer, answer_type CLOSED/OPEN, q_lang,
                                    modality, content_type (question type), location (body region), qid
    OUT/heldout_slake/imgs/*.png

The pictures are the scenes' files read by the converter's own reader (`render.scene_pixels`: window, slice,
RGB), so a benchmark image is what a training record of that scene would hold. Options are shuffled per
row and every label is uniform (scenes.py), so the text alone answers at chance.
"""
from __future__ import annotations

import base64
import csv
import io
from pathlib import Path

from gmaivl_rt.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from gmaivl_rt.data.synth.questions import applicable, mcq_options, question, true_answer, yes_no
from gmaivl_rt.data.synth.render import scene_pixels
from gmaivl_rt.data.synth.scenes import draw_scene, scene_rng
from gmaivl_rt.data.synth.writer import check_count

TSV_FILE = "heldout.tsv"
SLAKE_DIR = "heldout_slake"
SLAKE_FILE = "heldout.json"


def _png(pixels) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_benchmark(out, count: int, seed: int) -> dict:
    """Write the held-out TSV and SLAKE JSON for `count` scenes of seed `seed` into `out`.
    Returns {"tsv", "slake", "scenes", "mcq", "closed", "open"}."""
    count = check_count(count)
    out = Path(out)
    rows, slake = [], []
    for index in range(count):
        scene = draw_scene(seed, index)
        png = _png(scene_pixels(seed, index))
        rng = scene_rng(seed, index, "benchmark")
        image_name = f"imgs/{index:06d}.png"
        atomic_write_bytes(out / SLAKE_DIR / image_name, png)
        first = None
        for qtype in applicable(scene):
            q = question(scene, qtype, rng)
            options = mcq_options(q, rng)
            row_index = len(rows)
            rows.append({"index": row_index,
                         "image": base64.b64encode(png).decode("ascii") if first is None else str(first),
                         "question": q.text, **options,
                         "answer": next(k for k, v in options.items() if v == q.answer),
                         "category": qtype, "l2-category": scene.kind, "modality": scene.modality,
                         "department": scene.department, "split": "heldout"})
            first = row_index if first is None else first
            text, reply = yes_no(scene, qtype, rng)
            common = {"img_name": image_name, "q_lang": "en", "modality": scene.modality, "content_type": qtype,
                      "location": scene.region}
            slake.append({"qid": len(slake), **common, "question": text, "answer": reply, "answer_type": "CLOSED"})
            if qtype != "presence":
                slake.append({"qid": len(slake), **common, "question": question(scene, qtype, rng).text,
                              "answer": true_answer(scene, qtype), "answer_type": "OPEN"})
    columns = ["index", "image", "question", "A", "B", "C", "D", "answer", "category", "l2-category", "modality",
               "department", "split"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t", lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / TSV_FILE, buffer.getvalue())
    atomic_write_json(out / SLAKE_DIR / SLAKE_FILE, slake)
    return {"tsv": str(out / TSV_FILE), "slake": str(out / SLAKE_DIR / SLAKE_FILE), "scenes": count,
            "mcq": len(rows), "closed": sum(r["answer_type"] == "CLOSED" for r in slake),
            "open": sum(r["answer_type"] == "OPEN" for r in slake)}


def constant_image_tsv(tsv, out, grey: int = 128) -> Path:
    """The image-blind control's copy of a VLMEvalKit TSV: every row's image replaced by one constant grey
    picture (row 0 holds it, every other row reuses it by index). Same questions, options and answers."""
    import numpy as np

    tsv, out = Path(tsv), Path(out)
    with open(tsv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns, rows = reader.fieldnames, list(reader)
    png = base64.b64encode(_png(np.full((64, 64, 3), grey, np.uint8))).decode("ascii")
    for n, row in enumerate(rows):
        row["image"] = png if n == 0 else rows[0]["index"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out, buffer.getvalue())
    return out


__all__ = ["write_benchmark", "constant_image_tsv", "TSV_FILE", "SLAKE_DIR", "SLAKE_FILE"]

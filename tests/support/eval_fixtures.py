"""Small benchmark files in each format the eval readers take, written by the tests themselves."""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image


def png_bytes(colour, size=(24, 20)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def png_base64(colour, size=(24, 20)) -> str:
    return base64.b64encode(png_bytes(colour, size)).decode("ascii")


def write_tsv(path, rows: list[dict]) -> Path:
    """A VLMEvalKit TSV; None cells are written empty (pandas reads them as NaN)."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow(["" if row.get(c) is None else row[c] for c in columns])
    return Path(path)


COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 200), "grey": (128, 128, 128)}


def colour_benchmark(path, count=10) -> Path:
    """An MCQ TSV: "which colour is the image?" with A-D (some rows reuse an earlier row's image by index, one
    row has only three options, one has a hint)."""
    names = list(COLOURS)
    rows = []
    for i in range(count):
        colour = names[i % 4]
        options = names[i % 3:] + names[:i % 3]
        row = {"index": 100 + i, "image": png_base64(COLOURS[colour]) if i < 4 else str(100 + i % 4),
               "question": "Which colour is the image?", "hint": "Look at the whole image." if i == 1 else None,
               **dict(zip("ABCD", options)), "answer": "ABCD"[options.index(colour)],
               "category": colour, "split": "dev" if i % 2 else "test"}
        rows.append(row)
    rows[5]["D"] = None
    if rows[5]["answer"] == "D":
        rows[5]["answer"] = "A"
    return write_tsv(path, rows)


def write_json(path, data) -> Path:
    Path(path).write_text(json.dumps(data), encoding="utf-8")
    return Path(path)


def write_csv(path, header, rows) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return Path(path)


def image_file(path, colour=(10, 20, 30)) -> Path:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((12, 16, 3), colour, np.uint8)).save(path)
    return Path(path)

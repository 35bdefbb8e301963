"""Small datasets in GMAI-VL's format (meta.json + annotations/*.jsonl + PNG images) for the training tests.

The answer depends on the image (a coloured square on grey), so a model that uses the image can learn it."""
from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image

COLOURS = {"red": (200, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 200)}
QUESTIONS = ["What colour is the region?", "Which colour does the marked region have?", "Name the region's colour."]


def make_image(path: Path, colour: str, size=(40, 32)) -> None:
    image = Image.new("RGB", size, (128, 128, 128))
    w, h = size
    image.paste(Image.new("RGB", (w // 2, h // 2), COLOURS[colour]), (w // 4, h // 4))
    image.save(path)


def make_dataset(root, records_per_source=(12, 8), sample_ratios=(1.0, 0.5), seed=0, long_answer_words=0,
                 image_size=(40, 32)) -> Path:
    """Write `root/meta.json`, `root/annotations/<name>.jsonl`, `root/images/*.png`; returns root."""
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "annotations").mkdir(exist_ok=True)
    rng = random.Random(seed)
    meta = {}
    for s, (count, ratio) in enumerate(zip(records_per_source, sample_ratios)):
        name = f"source{s}"
        lines = []
        for i in range(count):
            colour = rng.choice(sorted(COLOURS))
            image = f"{name}_{i}.png"
            make_image(root / "images" / image, colour, image_size)
            answer = f"The region is {colour}."
            if long_answer_words:
                answer += " " + " ".join(rng.choice(["it", "is", "a", "clear", "finding"])
                                         for _ in range(long_answer_words))
            conversations = [{"from": "human", "value": f"<image>\n{rng.choice(QUESTIONS)}"},
                             {"from": "gpt", "value": answer}]
            if i % 3 == 0:  # some multi-turn records
                conversations += [{"from": "human", "value": "Is it large?"},
                                  {"from": "gpt", "value": "No, it is small."}]
            lines.append(json.dumps({"image": image, "conversations": conversations,
                                     "id": f"2d#cls#synthetic#{name}#{colour}#{image}",
                                     "width": image_size[0], "height": image_size[1]}))
        (root / "annotations" / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        meta[name] = {"image_dir": "images", "annotations": f"annotations/{name}.jsonl", "sample_ratio": ratio,
                      "length": count, "data_augment": False}
    (root / "meta.json").write_text(json.dumps(meta, indent=2))
    return root

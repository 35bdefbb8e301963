"""Small datasets in GMAI-VL's format (meta.json + annotations/*.jsonl + PNG images) for the training tests, and
the tiny model folders the tests load: a chat model with its own tokenizer (`make_tiny_chat_model`, behind the
`tiny_model_folder` fixture) and a training run's fresh --init (`make_init_model`).

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


def make_training_setup(root, records_per_source=(24, 16)) -> tuple[Path, Path]:
    """A fixture dataset plus a BPE tokenizer trained on it: (data_root, tokenizer_dir)."""
    from gmaivl_rt.train.tokenizer import conversation_texts, train_bpe_tokenizer

    root = Path(root)
    data = make_dataset(root / "data", records_per_source=records_per_source, sample_ratios=(1.0, 1.0))
    train_bpe_tokenizer(conversation_texts(data), root / "tokenizer", vocab_size=320, min_frequency=1)
    return data, root / "tokenizer"


def write_config(path, config: dict) -> Path:
    """A YAML config layer for `gmaivl-rt train --config`."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config))
    return Path(path)


def eval_loss(model_dir, data, tokenizer_dir, max_length=256) -> float:
    """Mean next-token loss over every predicted token of the data, packed as in training (no grad)."""
    import torch

    from gmaivl_rt import GMAIVL
    from gmaivl_rt.train.dataset import ImagePolicy, PackedDataset
    from gmaivl_rt.runtime.tokenizer import load_tokenizer

    model = GMAIVL.from_pretrained(model_dir).eval()
    dataset = PackedDataset(data, load_tokenizer(tokenizer_dir), ImagePolicy.from_model_config(model.config),
                            max_length=max_length, seed=0, progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(dataset)):
            batch = dataset[i]
            loss = model(batch["input_ids"], pixel_values=batch["pixel_values"], position_ids=batch["position_ids"],
                         labels=batch["labels"], cu_seqlens=batch["cu_seqlens"]).loss
            total += float(loss) * dataset.num_targets(i)
            count += dataset.num_targets(i)
    return total / count


def make_tiny_chat_model(path, texts, vocab_size=300, seed=0, **config) -> Path:
    """A `tiny`-preset model folder with a BPE tokenizer trained on `texts` (random weights, seeded): what the
    runtime, engine, server and evaluation tests load (through the `tiny_model_folder` fixture of
    tests/conftest.py; bench/ calls it directly). `config`: GMAIVLConfig.replace fields on top of the preset and
    the tokenizer's vocabulary, e.g. vision={"dynamic_resolution": True}."""
    import torch

    from gmaivl_rt import GMAIVL, GMAIVLConfig
    from gmaivl_rt.runtime.tokenizer import model_vocab_fields
    from gmaivl_rt.train.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(texts, path, vocab_size=vocab_size, min_frequency=1)
    model_config = GMAIVLConfig.preset("tiny").replace(**model_vocab_fields(tokenizer))
    if config:
        model_config = model_config.replace(**config)
    torch.manual_seed(seed)
    GMAIVL(model_config).save_pretrained(path)
    return Path(path)


def make_init_model(path, tokenizer, seed=0, **config) -> Path:
    """A fresh `tiny`-preset model folder sized to `tokenizer` (a transformers tokenizer, or its folder) the way the
    trainer sizes a new model (vocabulary, `<image>` id and special ids: train.recipe's preset config), random
    weights from `seed`: a training run's --init. `config`: GMAIVLConfig.replace fields on top."""
    import torch

    from gmaivl_rt import GMAIVL, GMAIVLConfig
    from gmaivl_rt.runtime.tokenizer import load_tokenizer
    from gmaivl_rt.train.recipe import _preset_config

    if isinstance(tokenizer, (str, Path)):
        tokenizer = load_tokenizer(tokenizer)
    model_config = _preset_config(GMAIVLConfig, "tiny", tokenizer)
    if config:
        model_config = model_config.replace(**config)
    torch.manual_seed(seed)
    GMAIVL(model_config).save_pretrained(path)
    return Path(path)

"""The training dataset: GMAI-VL meta-lists and JSONL conversations -> tokenized, label-masked, soft-packed sequences.

Pipeline (`PackedDataset`):
1. `load_meta` reads a meta-list (`{name: {image_dir, annotations, sample_ratio, length, data_augment}}`, or a data
   folder holding `meta.json`), `sample_records` honours each source's `sample_ratio` with a seeded RNG.
2. `ConversationEncoder` renders each record with the internlm2 chat template (`gmaivl_rt.chat.build_prompt`),
   tokenizes it turn by turn, sets labels to -100 everywhere except the assistant answers (their `<|im_end|>`
   included), and expands each `<image>` to that image's token count (`ImagePolicy`).
3. `gmaivl_rt.train.packing` soft-packs the samples into sequences of at most `max_length` tokens; item `i` of the
   dataset is pack `i`, collated for the model's packed path (`input_ids (1, T)`, `cu_seqlens`, ...).
"""
from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch

from .packing import Pack, collate_pack, pack_samples

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------------------- meta-list and records
@dataclass(frozen=True)
class Source:
    """One annotation file of a meta-list; paths resolved against the meta-list's folder."""
    name: str
    image_dir: Path
    annotations: Path
    sample_ratio: float = 1.0
    length: int | None = None
    data_augment: bool = False


def load_meta(data) -> list[Source]:
    """Read a meta-list: a JSON file, or a data folder containing `meta.json` (the data builder's output)."""
    path = Path(data)
    if path.is_dir():
        path = path / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"training data: no meta-list at {path} (give a data folder with meta.json "
                                "or the meta-list JSON itself)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"training data: meta-list {path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"training data: meta-list {path} must be a non-empty JSON object {{name: {{...}}}}")
    sources = []
    for name, entry in meta.items():
        missing = [k for k in ("image_dir", "annotations") if k not in entry]
        if missing:
            raise ValueError(f"training data: meta-list {path} entry {name!r} lacks {', '.join(missing)}")
        ratio = float(entry.get("sample_ratio", 1.0))
        if ratio < 0:
            raise ValueError(f"training data: meta-list {path} entry {name!r} has negative sample_ratio {ratio}")
        sources.append(Source(
            name=name,
            image_dir=(path.parent / entry["image_dir"]).resolve(),
            annotations=(path.parent / entry["annotations"]).resolve(),
            sample_ratio=ratio,
            length=entry.get("length"),
            data_augment=bool(entry.get("data_augment", False)),
        ))
    return sources


def iter_records(source: Source) -> Iterator[dict]:
    """The JSON records of one source's annotation file; a bad line is an error naming the file and line."""
    with open(source.annotations, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"training data: {source.annotations}:{line_no} is not valid JSON: {e}") from None


def sample_records(sources: Sequence[Source], seed: int) -> list[tuple[Source, dict]]:
    """All records, each source repeated/subsampled to `round(len * sample_ratio)` records.

    The integer part of the ratio repeats the whole file; the fraction picks a seeded random subset, so the same
    seed always gives the same records (in file order within a source).
    """
    rng = random.Random(seed)
    chosen = []
    for source in sources:
        records = list(iter_records(source))
        whole, fraction = divmod(source.sample_ratio, 1.0)
        extra_count = int(round(len(records) * fraction))
        extra = sorted(rng.sample(range(len(records)), extra_count)) if extra_count else []
        indices = [i for _ in range(int(whole)) for i in range(len(records))] + extra
        chosen.extend((source, records[i]) for i in indices)
    return chosen


# ------------------------------------------------------------------------------------------------------------ images
class ImagePolicy:
    """How an image becomes pixels and how many `<image>` tokens it takes.

    fixed (GMAI-VL): pad to square, resize to `image_size`, `num_image_tokens` tokens ((image_size / P)^2).
    dynamic (native resolution): keep the aspect ratio, `gmaivl_rt.vision_sizes.dynamic_resize_shape` picks (H, W)
    under the pixel budget, (H / P) * (W / P) tokens (+1 when select_strategy "full" keeps the CLS token).
    """

    def __init__(self, vision):
        self.vision = vision  # the model's VisionConfig

    @classmethod
    def from_model_config(cls, cfg) -> "ImagePolicy":
        return cls(cfg.vision)

    @property
    def dynamic(self) -> bool:
        return self.vision.dynamic_resolution

    def num_tokens(self, width: int, height: int) -> int:
        v = self.vision
        if not self.dynamic:
            return v.tokens_per_image()
        from gmaivl_rt.vision_sizes import dynamic_resize_shape

        return v.tokens_per_image(*dynamic_resize_shape(height, width, v.patch_size, v.min_pixels, v.max_pixels))

    def load(self, path) -> torch.Tensor:
        """(3, H, W) float32, CLIP-normalised (H = W = image_size in fixed mode)."""
        from PIL import Image

        from gmaivl_rt.chat import preprocess_image, preprocess_image_dynamic

        with Image.open(path) as im:
            image = im.convert("RGB")
        if self.dynamic:
            return preprocess_image_dynamic(image, self.vision.patch_size, self.vision.min_pixels,
                                            self.vision.max_pixels)
        return preprocess_image(image, self.vision.image_size)


# ----------------------------------------------------------------------------------------------------- conversations
@dataclass
class EncodedSample:
    """One tokenized conversation: `input_ids`/`labels` int32 (L,), images already expanded to their tokens."""
    input_ids: np.ndarray
    labels: np.ndarray
    image_paths: list[str] = field(default_factory=list)
    record_id: str = ""

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_targets(self) -> int:
        """Tokens the model is trained to predict: labels after the in-sample shift (the first is never a target)."""
        return int((self.labels[1:] != IGNORE_INDEX).sum())


class ConversationEncoder:
    """Record -> `EncodedSample`: chat template, per-turn label masking, `<image>` expansion, truncation."""

    def __init__(self, tokenizer, image_token_id: int, image_tokens: Callable[[str, dict], int], max_length: int,
                 system: str | None = None):
        from gmaivl_rt.chat import IMAGE_TOKEN, chat_segments

        self.tokenizer, self.image_token_id, self.image_tokens = tokenizer, image_token_id, image_tokens
        self.max_length, self.system = max_length, system
        self._chat_segments, self._image_token = chat_segments, IMAGE_TOKEN
        # What the tokenizer adds around a whole prompt at inference (InternLM2's `<s>`; nothing for ours).
        self._prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.truncated = 0

    def segments(self, conversations: list[dict]) -> list[tuple[str, bool]]:
        """The rendered chat (internlm2 chatml, `gmaivl_rt.chat.chat_segments`) as (text, is_answer) pieces;
        the answers are the assistant replies with their `<|im_end|>`."""
        pieces = self._chat_segments(conversations, system=self.system)
        if not any(is_answer for _, is_answer in pieces):
            raise ValueError("conversation has no assistant ('gpt') turn to learn from")
        return pieces

    def encode(self, record: dict, image_dir: Path) -> EncodedSample:
        record_id = str(record.get("id", ""))
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)
        try:
            pieces = self.segments(record.get("conversations") or [])
        except ValueError as e:
            raise ValueError(f"record {record_id!r}: {e}") from None
        ids, labels = list(self._prefix), [IGNORE_INDEX] * len(self._prefix)
        for text, is_answer in pieces:
            piece = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            ids.extend(piece)
            labels.extend(piece if is_answer else [IGNORE_INDEX] * len(piece))

        # `<image>` placeholders -> one token per image feature (never a label).
        positions = [i for i, t in enumerate(ids) if t == self.image_token_id]
        if len(positions) != len(images):
            raise ValueError(f"record {record_id!r}: {len(positions)} {self._image_token} placeholders for "
                             f"{len(images)} images")
        image_paths = [str(image_dir / p) for p in images]
        counts = [self.image_tokens(p, record) for p in image_paths]
        for path, n in zip(image_paths, counts):
            if n > self.max_length:
                raise ValueError(f"record {record_id!r}: image {path} takes {n} tokens, more than max_length "
                                 f"{self.max_length}; raise max_length or lower the image resolution")
        out_ids, out_labels, spans = [], [], []
        last = 0
        for pos, n in zip(positions, counts):
            out_ids += ids[last:pos]
            out_labels += labels[last:pos]
            spans.append((len(out_ids), len(out_ids) + n))
            out_ids += [self.image_token_id] * n
            out_labels += [IGNORE_INDEX] * n
            last = pos + 1
        out_ids += ids[last:]
        out_labels += labels[last:]

        if len(out_ids) > self.max_length:
            cut = self.max_length
            for start, end in spans:  # never cut through an image: drop it whole
                if start < cut < end:
                    cut = start
            kept = sum(1 for start, _ in spans if start < cut)
            logger.warning("record %r: %d tokens exceed max_length %d; truncated to %d tokens (%d of %d images kept)",
                           record_id, len(out_ids), self.max_length, cut, kept, len(spans))
            self.truncated += 1
            out_ids, out_labels, image_paths = out_ids[:cut], out_labels[:cut], image_paths[:kept]
        return EncodedSample(np.asarray(out_ids, dtype=np.int32), np.asarray(out_labels, dtype=np.int32),
                             image_paths, record_id)


def _record_image_size(path: str, record: dict) -> tuple[int, int]:
    """(width, height) from the record when it has them (single-image records), else from the file header."""
    if isinstance(record.get("image"), str) and record.get("width") and record.get("height"):
        return int(record["width"]), int(record["height"])
    from PIL import Image

    with Image.open(path) as im:
        return im.size


# ------------------------------------------------------------------------------------------------------ the dataset
class PackedDataset(torch.utils.data.Dataset):
    """Soft-packed training sequences; item `i` is pack `i` collated for the model (see `packing.collate_pack`).

    data: a data folder with meta.json, or a meta-list path. tokenizer: a transformers tokenizer with `<image>`.
    image_policy: `ImagePolicy`. max_length: tokens per pack (and the truncation length of one sample).
    seed: decides `sample_ratio` subsets and the order samples are packed in.
    """

    def __init__(self, data, tokenizer, image_policy: ImagePolicy, max_length: int = 2048, seed: int = 0,
                 system: str | None = None, open_packs: int = 64, progress: bool = True):
        from tqdm.auto import tqdm

        from .tokenizer import image_token_id

        self.image_policy, self.max_length = image_policy, max_length
        self.image_token_id = image_token_id(tokenizer)
        encoder = ConversationEncoder(
            tokenizer, self.image_token_id,
            lambda path, record: image_policy.num_tokens(*_record_image_size(path, record)),
            max_length, system=system)
        records = sample_records(load_meta(data), seed)
        if not records:
            raise ValueError(f"training data {data}: no records")
        random.Random(seed).shuffle(records)
        self.samples, self.num_without_targets = [], 0
        for source, record in tqdm(records, desc="tokenizing", unit="sample",
                                   disable=not progress or len(records) < 2000):
            sample = encoder.encode(record, source.image_dir)
            if sample.num_targets == 0:  # truncation cut away every answer token: nothing to learn, and 0/0 loss
                logger.warning("record %r: no answer tokens left after truncation to %d; left out of training",
                               sample.record_id, max_length)
                self.num_without_targets += 1
                continue
            self.samples.append(sample)
        if not self.samples:
            raise ValueError(f"training data {data}: no sample keeps an answer token within max_length {max_length}")
        self.num_truncated = encoder.truncated
        if self.num_truncated:
            logger.warning("%d of %d samples were truncated to max_length %d", self.num_truncated,
                           len(self.samples), max_length)
        self.packs: list[Pack] = pack_samples([len(s) for s in self.samples], max_length, open_packs=open_packs)

    def __len__(self) -> int:
        return len(self.packs)

    def num_targets(self, index: int) -> int:
        """Predicted tokens in pack `index` (used to normalise the loss over a global batch)."""
        return sum(self.samples[i].num_targets for i in self.packs[index].sample_indices)

    def num_tokens(self, index: int) -> int:
        return self.packs[index].length

    def __getitem__(self, index: int) -> dict:
        samples = [self.samples[i] for i in self.packs[index].sample_indices]
        images = [self.image_policy.load(p) for s in samples for p in s.image_paths]
        return collate_pack(samples, images, fixed_size=not self.image_policy.dynamic)

    def stats(self) -> dict:
        lengths = [p.length for p in self.packs]
        return {"samples": len(self.samples), "packs": len(self.packs), "truncated": self.num_truncated,
                "left_out_no_targets": self.num_without_targets,
                "tokens": int(sum(lengths)),
                "fill": float(sum(lengths) / (len(lengths) * self.max_length)) if lengths else math.nan}

"""The training dataset: GMAI-VL meta-lists and JSONL conversations -> tokenized, label-masked, soft-packed sequences.

Pipeline (`PackedDataset`):
1. `load_meta` reads a meta-list (`{name: {image_dir, annotations, sample_ratio, length, data_augment}}`, or a data
   folder holding `meta.json`), `sample_records` honours each source's `sample_ratio` with a seeded RNG.
2. `ConversationEncoder` renders each record with the internlm2 chat template (`gmaivl_rt.model.chat.build_prompt`),
   tokenizes it turn by turn, sets labels to -100 everywhere except the assistant answers (their `<|im_end|>`
   included), and expands each `<image>` to that image's token count (`ImagePolicy`).
3. `gmaivl_rt.train.packing` soft-packs the samples into sequences of at most `max_length` tokens; item `i` of the
   dataset is pack `i`, collated for the model's packed path (`input_ids (1, T)`, `cu_seqlens`, ...).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator, Sequence

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
    records = [list(iter_records(source)) for source in sources]
    return [(sources[s], records[s][i]) for s, i in sample_indices(sources, [len(r) for r in records], seed)]


def sample_indices(sources: Sequence[Source], counts: Sequence[int], seed: int) -> list[tuple[int, int]]:
    """`sample_records` as (source index, record index) pairs, given each source's record count."""
    rng = random.Random(seed)
    chosen = []
    for s, (source, n) in enumerate(zip(sources, counts)):
        whole, fraction = divmod(source.sample_ratio, 1.0)
        extra_count = int(round(n * fraction))
        extra = sorted(rng.sample(range(n), extra_count)) if extra_count else []
        chosen.extend((s, i) for i in [i for _ in range(int(whole)) for i in range(n)] + extra)
    return chosen


# ------------------------------------------------------------------------------------------------------------ images
class ImagePolicy:
    """How an image becomes pixels and how many `<image>` tokens it takes.

    fixed (GMAI-VL): pad to square, resize to `image_size`, `num_image_tokens` tokens ((image_size / P)^2).
    dynamic (native resolution): keep the aspect ratio, `gmaivl_rt.model.vision_sizes.dynamic_resize_shape` picks (H, W)
    under the pixel budget, (H / P) * (W / P) tokens (+1 when select_strategy "full" keeps the CLS token).
    """

    # Decoded pictures kept per process, up to this many bytes (the train config's data.image_cache_mb): an epoch
    # re-reads every image (the demo's ~800 pictures, 150 KB each at 112 px, were 5 % of a stage III step as PNG
    # decode + resize); 0 turns it off.
    CACHE_BYTES = 512 * 2**20

    def __init__(self, vision, cache_bytes: int | None = None):
        self.vision = vision  # the model's VisionConfig
        self.cache_bytes = self.CACHE_BYTES if cache_bytes is None else int(cache_bytes)
        self._cache: dict[str, torch.Tensor] = {}
        self._cached_bytes = 0

    @classmethod
    def from_model_config(cls, cfg, cache_bytes: int | None = None) -> "ImagePolicy":
        return cls(cfg.vision, cache_bytes)

    @property
    def dynamic(self) -> bool:
        return self.vision.dynamic_resolution

    def num_tokens(self, width: int, height: int) -> int:
        v = self.vision
        if not self.dynamic:
            return v.tokens_per_image()
        from gmaivl_rt.model.vision_sizes import dynamic_resize_shape

        return v.tokens_per_image(*dynamic_resize_shape(height, width, v.patch_size, v.min_pixels, v.max_pixels))

    def load(self, path) -> torch.Tensor:
        """(3, H, W) float32, CLIP-normalised (H = W = image_size in fixed mode): a fresh tensor, from the cache of
        decoded pictures once `path` was read (first come, kept while they fit in `cache_bytes`)."""
        key = str(path)
        cached = self._cache.get(key)
        if cached is not None:
            return cached.clone()
        pixels = self._decode(path)
        size = pixels.numel() * pixels.element_size()
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[key] = pixels.clone()
            self._cached_bytes += size
        return pixels

    def _decode(self, path) -> torch.Tensor:
        from PIL import Image

        from gmaivl_rt.model.preprocess import preprocess_image, preprocess_image_dynamic

        with Image.open(path) as im:
            image = im.convert("RGB")
        if self.dynamic:
            return preprocess_image_dynamic(image, self.vision.patch_size, self.vision.min_pixels,
                                            self.vision.max_pixels)
        return preprocess_image(image, self.vision.image_size)


# ----------------------------------------------------------------------------------------------------- conversations
@dataclass(slots=True)
class EncodedSample:
    """One tokenized conversation: `input_ids`/`labels` int32 (L,), images already expanded to their tokens.
    num_targets: tokens the model is trained to predict, i.e. labels after the in-sample shift (the first is never a
    target); counted from `labels` when not given."""
    input_ids: np.ndarray
    labels: np.ndarray
    image_paths: list[str] = field(default_factory=list)
    record_id: str = ""
    truncated: bool = False
    num_targets: int = -1

    def __post_init__(self):
        if self.num_targets < 0:
            self.num_targets = int((self.labels[1:] != IGNORE_INDEX).sum())

    def __len__(self) -> int:
        return len(self.input_ids)


class ConversationEncoder:
    """Record -> `EncodedSample`: chat template, per-turn label masking, `<image>` expansion, truncation."""

    def __init__(self, tokenizer, image_token_id: int, image_tokens: Callable[[str, dict], int], max_length: int,
                 system: str | None = None):
        from gmaivl_rt.model.chat import IMAGE_TOKEN, chat_segments

        self.tokenizer, self.image_token_id, self.image_tokens = tokenizer, image_token_id, image_tokens
        self.max_length, self.system = max_length, system
        self._chat_segments, self._image_token = chat_segments, IMAGE_TOKEN
        # What the tokenizer adds around a whole prompt at inference (InternLM2's `<s>`; nothing for ours).
        self._prefix = list(tokenizer("", add_special_tokens=True)["input_ids"])
        self.truncated = 0

    def segments(self, conversations: list[dict]) -> list[tuple[str, bool]]:
        """The rendered chat (internlm2 chatml, `gmaivl_rt.model.chat.chat_segments`) as (text, is_answer) pieces;
        the answers are the assistant replies with their `<|im_end|>`."""
        pieces = self._chat_segments(conversations, system=self.system)
        if not any(is_answer for _, is_answer in pieces):
            raise ValueError("conversation has no assistant ('gpt') turn to learn from")
        return pieces

    def encode(self, record: dict, image_dir: Path) -> EncodedSample:
        return self.encode_many([record], image_dir)[0]

    def encode_many(self, records: Sequence[dict], image_dir: Path) -> list[EncodedSample]:
        """Encode records of one source; every chat piece goes through the fast tokenizer's batch call at once."""
        pieces_of = []
        for record in records:
            try:
                pieces_of.append(self.segments(record.get("conversations") or []))
            except ValueError as e:
                raise ValueError(f"record {str(record.get('id', ''))!r}: {e}") from None
        texts = [text for pieces in pieces_of for text, _ in pieces]
        tokenized = iter(self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else [])
        samples = []
        for record, pieces in zip(records, pieces_of):
            ids, labels = list(self._prefix), [IGNORE_INDEX] * len(self._prefix)
            for _, is_answer in pieces:
                piece = next(tokenized)
                ids.extend(piece)
                labels.extend(piece if is_answer else [IGNORE_INDEX] * len(piece))
            samples.append(self._finish(record, ids, labels, image_dir))
        return samples

    def _finish(self, record: dict, ids: list, labels: list, image_dir: Path) -> EncodedSample:
        """Expand `<image>` placeholders and truncate one tokenized record."""
        record_id = str(record.get("id", ""))
        images = record.get("image") or []
        images = [images] if isinstance(images, str) else list(images)

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

        full_length = len(out_ids)
        if full_length > self.max_length:
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
                             image_paths, record_id, truncated=len(out_ids) < full_length)


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
                 system: str | None = None, open_packs: int = 64, progress: bool = True,
                 cache_dir: str | Path | None = "auto"):
        from gmaivl_rt.runtime.tokenizer import image_token_id

        self.image_policy, self.max_length = image_policy, max_length
        self.image_token_id = image_token_id(tokenizer)
        encoder = ConversationEncoder(
            tokenizer, self.image_token_id,
            lambda path, record: image_policy.num_tokens(*_record_image_size(path, record)),
            max_length, system=system)
        sources = load_meta(data)
        if cache_dir == "auto":
            cache_dir = _meta_folder(data) / ".cache" / "tokenized"
        cache = TokenCache(cache_dir, _encoding_key(encoder, image_policy)) if cache_dir is not None else None
        encoded = _encode_sources(sources, encoder, cache, progress)
        self.tokenized_records = sum(n for _, n in encoded)
        tables = [table for table, _ in encoded]
        chosen = sample_indices(sources, [len(table) for table in tables], seed)
        if not chosen:
            raise ValueError(f"training data {data}: no records")
        random.Random(seed).shuffle(chosen)
        # Per chosen sample: its source table, index, length, targets, truncation (vectorised: millions of samples).
        table_of, index = np.array(chosen, dtype=np.int64).T
        lengths, targets, truncated = (np.zeros(len(chosen), dtype=np.int64) for _ in range(3))
        for t, table in enumerate(tables):
            rows = table_of == t
            lengths[rows], targets[rows] = table.lengths[index[rows]], table.targets[index[rows]]
            truncated[rows] = table.truncated[index[rows]]
        self.num_truncated = int(truncated.sum())
        for k in np.flatnonzero(targets == 0):  # truncation cut away every answer token: nothing to learn, 0/0 loss
            logger.warning("record %r: no answer tokens left after truncation to %d; left out of training",
                           tables[table_of[k]].info[index[k]][0], max_length)
        keep = targets > 0
        self.num_without_targets = int((~keep).sum())
        if not keep.any():
            raise ValueError(f"training data {data}: no sample keeps an answer token within max_length {max_length}")
        if self.num_truncated:
            logger.warning("%d of %d samples were truncated to max_length %d", self.num_truncated,
                           int(keep.sum()), max_length)
        self.samples = ChosenSamples(tables, table_of[keep], index[keep])
        self._targets = targets[keep].tolist()
        self.packs: list[Pack] = pack_samples(lengths[keep].tolist(), max_length, open_packs=open_packs)

    def __len__(self) -> int:
        return len(self.packs)

    def num_targets(self, index: int) -> int:
        """Predicted tokens in pack `index` (used to normalise the loss over a global batch)."""
        return sum(self._targets[i] for i in self.packs[index].sample_indices)

    def num_tokens(self, index: int) -> int:
        return self.packs[index].length

    def __getitem__(self, index: int) -> dict:
        samples = [self.samples[i] for i in self.packs[index].sample_indices]
        images = [self.image_policy.load(p) for s in samples for p in s.image_paths]
        return collate_pack(samples, images, fixed_size=not self.image_policy.dynamic)

    def stats(self) -> dict:
        lengths = [p.length for p in self.packs]
        return {"samples": len(self.samples), "packs": len(self.packs), "truncated": self.num_truncated,
                "tokenized_records": self.tokenized_records,
                "left_out_no_targets": self.num_without_targets,
                "tokens": int(sum(lengths)),
                "fill": float(sum(lengths) / (len(lengths) * self.max_length)) if lengths else math.nan}


# --------------------------------------------------------------------------------------------- the tokenization cache
_CACHE_VERSION = 1


def _meta_folder(data) -> Path:
    path = Path(data)
    return path if path.is_dir() else path.parent


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()


def _encoding_key(encoder: ConversationEncoder, image_policy: ImagePolicy) -> dict:
    """Everything besides the annotation file that decides a record's encoding: tokenizer, chat template (a probe
    conversation rendered by it), system prompt, max_length and the image token rule."""
    from dataclasses import asdict

    probe = encoder.segments([{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "a"}])
    return {"v": _CACHE_VERSION, "tokenizer": _tokenizer_fingerprint(encoder.tokenizer), "template": probe,
            "max_length": encoder.max_length, "vision": asdict(image_policy.vision),
            "image_token_id": encoder.image_token_id, "prefix": encoder._prefix}


class SampleTable:
    """One source's encoded samples stored flat, as the cache file holds them: concatenated `ids`/`labels` int32,
    `offsets` (n + 1,) int64, `truncated` (n,) bool and `info` [[record_id, [image paths relative to image_dir]]].
    Item i is an `EncodedSample` made on demand, so millions of samples cost a few arrays, not millions of objects."""

    def __init__(self, ids, labels, offsets, truncated, info, image_dir: Path):
        self.ids, self.labels, self.offsets, self.truncated, self.info = ids, labels, offsets, truncated, info
        self.image_dir = Path(image_dir)
        self.lengths = np.diff(offsets)
        is_target = labels != IGNORE_INDEX
        is_target[offsets[:-1][self.lengths > 0]] = False  # a sample's first token is never a target (shift)
        self.targets = np.add.reduceat(is_target, offsets[:-1]) if len(labels) else np.zeros(len(info), np.int64)

    @classmethod
    def from_samples(cls, samples: Sequence[EncodedSample], image_dir: Path) -> "SampleTable":
        offsets = np.zeros(len(samples) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(s) for s in samples])
        empty = np.zeros(0, np.int32)
        info = [[s.record_id, [Path(p).relative_to(image_dir).as_posix() for p in s.image_paths]] for s in samples]
        return cls(np.concatenate([s.input_ids for s in samples]) if samples else empty,
                   np.concatenate([s.labels for s in samples]) if samples else empty, offsets,
                   np.array([s.truncated for s in samples], dtype=bool), info, image_dir)

    def __len__(self) -> int:
        return len(self.info)

    def __getitem__(self, i: int) -> EncodedSample:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        record_id, images = self.info[i]
        return EncodedSample(self.ids[a:b], self.labels[a:b], [str(self.image_dir / p) for p in images], record_id,
                             bool(self.truncated[i]), int(self.targets[i]))


class ChosenSamples(Sequence):
    """The dataset's samples in packing order: item k is sample `index[k]` of table `table_of[k]`."""

    def __init__(self, tables: list[SampleTable], table_of: np.ndarray, index: np.ndarray):
        self.tables, self.table_of, self.index = tables, table_of, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, k: int) -> EncodedSample:
        return self.tables[self.table_of[k]][int(self.index[k])]


class TokenCache:
    """Encoded samples of one annotation file, stored as `<dir>/<source>-<key>.npz` (no pickle): the key hashes the
    file's bytes and `_encoding_key`, so any change of data, tokenizer, template or max_length misses."""

    def __init__(self, folder, encoding_key: dict):
        self.folder, self.encoding_key = Path(folder), encoding_key

    def path(self, source: Source) -> Path:
        from gmaivl_rt.atomic import file_sha256

        blob = json.dumps({**self.encoding_key, "annotations": file_sha256(source.annotations)}, sort_keys=True)
        return self.folder / f"{source.name}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}.npz"

    def load(self, path: Path, source: Source) -> SampleTable | None:
        try:
            with np.load(path, allow_pickle=False) as z:
                return SampleTable(z["ids"], z["labels"], z["offsets"], z["truncated"],
                                   json.loads(z["info"].tobytes().decode("utf-8")), source.image_dir)
        except (OSError, ValueError, KeyError):
            return None

    def save(self, path: Path, source: Source, table: SampleTable) -> None:
        import io

        from gmaivl_rt.atomic import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, ids=table.ids, labels=table.labels, offsets=table.offsets, truncated=table.truncated,
                 info=np.frombuffer(json.dumps(table.info).encode("utf-8"), dtype=np.uint8))
        try:
            atomic_write_bytes(path, buf.getvalue())
            for stale in path.parent.glob(f"{source.name}-*.npz"):  # older encodings of this source
                if stale != path:
                    stale.unlink(missing_ok=True)
        except OSError as e:
            logger.warning("tokenization cache not written (%s: %s); the next start tokenizes again",
                           path.parent, e.strerror or type(e).__name__)


def _encode_sources(sources, encoder, cache: TokenCache | None, progress: bool) -> list[tuple[SampleTable, int]]:
    """Each source's encoded samples (a SampleTable, in file order) and how many records were tokenized for it (0 when cached).
    Under torch.distributed rank 0 fills the cache first; the other ranks then read it."""
    import torch.distributed as dist

    ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and cache is not None
    if ranks and dist.get_rank() != 0:
        dist.barrier()  # wait for rank 0's cache
    out = [_encode_source(source, encoder, cache, progress) for source in sources]
    if ranks and dist.get_rank() == 0:
        dist.barrier()
    tokenized = sum(n for _, n in out)
    logger.info("training data: %d records tokenized, %d read from the cache", tokenized,
                sum(len(table) for table, _ in out) - tokenized)
    return out


def _encode_source(source: Source, encoder, cache: TokenCache | None, progress: bool, chunk: int = 4096):
    from tqdm.auto import tqdm

    path = cache.path(source) if cache is not None else None
    if path is not None and path.is_file():
        table = cache.load(path, source)
        if table is not None:
            return table, 0
    records = list(iter_records(source))
    samples = []
    with tqdm(total=len(records), desc=f"tokenizing {source.name}", unit="sample",
              disable=not progress or len(records) < 2000) as bar:
        for start in range(0, len(records), chunk):
            samples += encoder.encode_many(records[start:start + chunk], source.image_dir)
            bar.update(len(records[start:start + chunk]))
    table = SampleTable.from_samples(samples, source.image_dir)
    if path is not None:
        cache.save(path, source, table)
    return table, len(records)

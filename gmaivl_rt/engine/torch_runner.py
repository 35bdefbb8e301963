"""The torch backend's model runner: one forward of `GMAIVL` over a batch the scheduler made, over a `PagedKVCache`.

`run(batch)` feeds every row's uncached tokens (new prompts packed with single decode tokens alike) through the
model, with the keys and values going into each sequence's blocks, and returns the logits at each row's last token.
It touches no queue and decides nothing: which sequences run and which blocks they hold is the scheduler's
(gmaivl_rt/engine/scheduler.py). Projected image features are kept per image (by content key, LRU), so a follow-up
about the same image never runs the vision tower again, even where its prompt departs from the cached one inside a
KV block."""
from __future__ import annotations

from collections import OrderedDict

import torch

from gmaivl_rt.engine.paged_cache import PagedKVCache
from gmaivl_rt.runtime.batching import pixel_batch


class TorchRunner:
    """model: a GMAIVL (its weights' device and dtype are the runner's); block_size: tokens per KV block;
    kv_cache_tokens: the KV pool's size in tokens (None: max_batch_size x 1024, at most the model's context per
    request); compile: run batches of one new token per row through the compiled decode step
    (gmaivl_rt/engine/compiled_decode.py), for compile_buckets batch sizes (default: powers of two up to
    max_batch_size)."""

    FEATURE_CACHE_IMAGES = 32  # projected features of recent images kept for follow-up questions

    def __init__(self, model, block_size: int, kv_cache_tokens: int | None, max_batch_size: int,
                 compile: bool = False, compile_buckets: list[int] | None = None):
        self.model, self.config = model, model.config
        weight = model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        if kv_cache_tokens is None:
            kv_cache_tokens = max_batch_size * min(1024, self.config.text.context_length)
        num_blocks = -(-int(kv_cache_tokens) // block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}")
        self.cache = PagedKVCache(self.config, num_blocks, block_size, self.dtype, self.device)
        self._features = OrderedDict()  # image key -> projected features (tokens, hidden), least recent first
        self.compiled = None  # the compiled decode step (gmaivl_rt/engine/compiled_decode.py) where asked for
        if compile:
            from gmaivl_rt.engine.compiled_decode import CompiledDecode, buckets_for

            self.compiled = CompiledDecode(model, self.cache, compile_buckets or buckets_for(max_batch_size))

    @property
    def block_pool(self):
        """The block accounting of this runner's cache, which the scheduler owns and the forward reads."""
        return self.cache.pool

    @property
    def block_bytes(self) -> int:
        return self.cache.bytes_per_block

    @torch.no_grad()
    def run(self, batch) -> torch.Tensor:
        """One forward over the rows' uncached tokens seq.ids[seq.cached:] (or the next batch.feeds[row] of them:
        chunked prefill), each row's blocks (seq.blocks) already
        holding room for them. Returns (rows, vocab) float32 logits at each row's last token."""
        rows = batch.seqs
        # chunked prefill: a row feeds only its next feeds[r] uncached tokens (None: all of them)
        stops = [len(seq.ids) if batch.feeds is None else seq.cached + batch.feeds[r] for r, seq in enumerate(rows)]
        new = [seq.ids[seq.cached:stop] for seq, stop in zip(rows, stops)]
        lengths = [len(n) for n in new]
        width = max(lengths)
        slots = None  # the prompt's image slots, never generated ids (None: no image token runs in this batch)
        for r, (seq, stop) in enumerate(zip(rows, stops)):
            if seq.image_spans and self._images_to_feed(seq, stop):
                slots = torch.zeros(len(rows), width, dtype=torch.bool) if slots is None else slots
                for start, end in seq.image_spans:
                    slots[r, max(0, start - seq.cached):max(0, min(end, stop) - seq.cached)] = True
        tables = batch.block_tables if batch.block_tables is not None else [seq.blocks for seq in rows]
        if width == 1 and slots is None and self.compiled is not None and torch.is_tensor(tables):
            logits = self._run_compiled(rows, [n[0] for n in new], tables)
            if logits is not None:
                return logits
        # right-padded: the model packs the rows by the mask, so the padding side does not matter here
        input_ids = torch.tensor(new if width == 1 else [n + [0] * (width - len(n)) for n in new], dtype=torch.int64)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
        if slots is None:
            slots = torch.zeros(len(rows), width, dtype=torch.bool)
        features = self._image_features(rows, stops)
        self.cache.bind(tables, [seq.cached for seq in rows])
        return self.model.last_logits(input_ids.to(self.device), None, mask.to(self.device), self.cache,
                                      image_features=features, image_slots=slots.to(self.device))

    def _run_compiled(self, rows, ids: list, tables):
        """A batch of one new token per row (`ids`, one int per sequence in `rows`) through the compiled decode
        step: (rows, vocab) fp32 logits, or None (run it eagerly). The step's index tensors are made from the
        sequences' own lists (each new token's slot from its block list), a few Python ints a row rather than a
        chain of small tensor ops each step."""
        device, block_size = self.device, self.cache.block_size
        cached = [seq.cached for seq in rows]
        slots = [seq.blocks[c // block_size] * block_size + c % block_size for seq, c in zip(rows, cached)]
        return self.compiled.run(torch.tensor(ids, dtype=torch.int64, device=device),
                                 torch.tensor(cached, dtype=torch.int64, device=device), tables.to(device),
                                 torch.tensor([c + 1 for c in cached], dtype=torch.int32, device=device),
                                 torch.tensor(slots, dtype=torch.int64, device=device), max_position=max(cached))

    @staticmethod
    def _images_to_feed(seq, stop: int) -> list:
        """(image index, first feature, end feature) of each image with tokens in seq.ids[seq.cached:stop]."""
        return [(i, max(0, seq.cached - start), min(end, stop) - start)
                for i, (start, end) in enumerate(seq.image_spans) if end > seq.cached and start < stop]

    def _image_features(self, rows, stops: list):
        """Projected features of the image tokens the rows run next (up to each row's stop), (tokens, hidden), in
        token order, or None. Images not in the feature cache go through the vision tower together, once each; a
        chunk that ends inside an image takes the slice it covers, the next chunk the rest from the same cache
        (an image evicted meanwhile is projected again: the same features)."""
        wanted = [(seq, *image) for seq, stop in zip(rows, stops) for image in self._images_to_feed(seq, stop)]
        if not wanted:
            return None
        missing = {}
        for seq, i, _, _ in wanted:
            key = seq.image_keys[i]
            if key in self._features:
                self._features.move_to_end(key)
            else:
                missing.setdefault(key, seq.pixels[i])
        if missing:
            pixels = list(missing.values())
            encoded = self.model.encode_images(pixel_batch(pixels, self.config.vision.dynamic_resolution))
            counts = [self.config.vision.tokens_per_image(p.shape[-2], p.shape[-1]) for p in pixels]
            for key, features in zip(missing, encoded.split(counts)):
                self._features[key] = features
            while len(self._features) > max(self.FEATURE_CACHE_IMAGES, len(missing)):
                self._features.popitem(last=False)
        return torch.cat([self._features[seq.image_keys[i]][first:end] for seq, i, first, end in wanted])

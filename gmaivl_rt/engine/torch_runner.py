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
    request); compile: run text-only batches through the compiled decode step (gmaivl_rt/engine/compiled_decode.py),
    one row per new token, for compile_buckets batch sizes (default `buckets_for(max_batch_size)`: powers of two
    up to max_batch_size, and 16 rows for short prefills)."""

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
        if slots is None and self.compiled is not None and torch.is_tensor(tables):
            logits = self._run_compiled(rows, new, tables)
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

    def _run_compiled(self, rows, new: list, tables):
        """A text-only batch (`new`: per sequence in `rows` its new token ids, a list of ints) through the compiled
        decode step: (rows, vocab) fp32 logits at each sequence's last new token, or None (run it eagerly: more
        rows than the largest bucket, a prefill gathering too much (`CompiledDecode.takes_prefill`), or compiling
        failed). A sequence feeding k tokens (a short prompt, a
        follow-up after its cached prefix, a chunk of one) becomes k decode rows: positions cached..cached+k-1,
        each attending up to its own (seqlens_after), its block table repeated. Each layer of the step stores
        every row's key/value before the paged attention reads any (`PagedKVCache.attend` with DecodeRows), so
        the k rows are the sequence's causal prefill, at the cost of a decode step of k rows instead of an eager
        forward's fixed per-op cost. The index tensors come from the sequences' own lists (each token's slot from
        its block list), a few Python ints a token rather than a chain of small tensor ops each step."""
        counts = [len(tokens) for tokens in new]
        total = sum(counts)
        device, block_size = self.device, self.cache.block_size
        if total > len(rows) and not self.compiled.takes_prefill(total, tables.shape[1] * block_size):
            return None
        ids, positions, slots = [], [], []
        for seq, tokens in zip(rows, new):
            ids += tokens
            for position in range(seq.cached, seq.cached + len(tokens)):
                positions.append(position)
                slots.append(seq.blocks[position // block_size] * block_size + position % block_size)
        if total > len(rows):  # each sequence's table once per row it feeds
            tables = tables.repeat_interleave(torch.tensor(counts), dim=0)
        logits = self.compiled.run(torch.tensor(ids, dtype=torch.int64, device=device),
                                   torch.tensor(positions, dtype=torch.int64, device=device), tables.to(device),
                                   torch.tensor([p + 1 for p in positions], dtype=torch.int32, device=device),
                                   torch.tensor(slots, dtype=torch.int64, device=device),
                                   max_position=max(positions))
        if logits is None or total == len(rows):
            return logits
        last = torch.tensor(counts).cumsum(0) - 1  # each sequence's last row
        return logits[last.to(logits.device)]

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

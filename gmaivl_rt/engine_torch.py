"""The torch backend's scheduler step: continuous batching over a `PagedKVCache` with prefix reuse.

One step: admit waiting requests while slots and blocks allow (first looking their prompt up in the prefix cache),
give every running request the blocks its next tokens need (preempting the youngest when the pool is full), run
one forward of `GMAIVL` over all of them (new prompts packed with single decode tokens) and hand each request's
last-position logits to the engine, which picks and streams the token. Projected image features are kept per
image (by content key, LRU), so a follow-up about the same image never runs the vision tower again, even where its
prompt departs from the cached one inside a KV block."""
from __future__ import annotations

from collections import OrderedDict

import torch

from gmaivl_rt.errors import LimitError
from gmaivl_rt.paged_cache import PagedKVCache, block_keys


class TorchStepper:
    FEATURE_CACHE_IMAGES = 32  # projected features of recent images kept for follow-up questions
    def __init__(self, engine, block_size: int, kv_cache_tokens: int | None):
        self.engine = engine
        self.model = engine.backend.model
        self.config = self.model.config
        weight = self.model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        if kv_cache_tokens is None:
            kv_cache_tokens = engine.max_batch_size * min(1024, self.config.text.context_length)
        num_blocks = -(-int(kv_cache_tokens) // block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}")
        self.cache = PagedKVCache(self.config, num_blocks, block_size, self.dtype, self.device)
        self.pool = self.cache.pool
        self._features = OrderedDict()  # image key -> projected features (tokens, hidden), least recent first

    # ------------------------------------------------------------------ engine hooks
    def block_stats(self) -> dict:
        return {"kv_blocks_used": self.pool.num_used, "kv_blocks_free": self.pool.num_free,
                "kv_blocks_cached": self.pool.num_cached, "kv_blocks_peak": self.pool.peak_used,
                "kv_block_size": self.pool.block_size, "kv_block_bytes": self.cache.bytes_per_block}

    def make_sequence(self, request, prepared, engine_options):
        from gmaivl_rt.engine import sequence_from_request

        seq = sequence_from_request(request, prepared, engine_options, self.config.text, self.config.image_token_index,
                                    self.config.vision.tokens_per_image, self.device)
        # the last token is never fed, so prompt + max_new_tokens - 1 positions need keys/values
        needed = self.pool.blocks_for(seq.prompt_len + seq.max_new_tokens - 1)
        if needed > self.pool.num_blocks:
            raise LimitError(f"the request needs {needed} KV blocks ({seq.prompt_len} prompt tokens + "
                             f"max_new_tokens {seq.max_new_tokens}) but the engine's cache holds "
                             f"{self.pool.num_blocks} (kv_cache_tokens)")
        seq.pixels = [p.to(self.device, self.dtype) for p in seq.pixels]
        return seq

    def release(self, seq, keep_prefix: bool) -> None:
        """Return a sequence's blocks; with keep_prefix its full blocks join the prefix cache first."""
        if keep_prefix:
            keys = block_keys(seq.ids[:seq.cached], self.pool.block_size, seq.image_spans, seq.image_keys)
            for key, block in zip(keys, seq.blocks):
                self.pool.register(key, block)
        self.pool.release(seq.blocks)
        seq.blocks, seq.cached = [], 0

    # ------------------------------------------------------------------ one iteration
    def step(self) -> None:
        engine = self.engine
        with engine._cv:
            self._admit()
            self._grow_blocks()
            rows = list(engine._running)
        if not rows:
            return
        # One forward for every row: prompts being prefilled and answers being decoded alike.
        try:
            logits = self._forward(rows)
        except Exception:
            if len(rows) == 1:
                raise
            logits = None
        for i, seq in enumerate(rows):
            if logits is None:  # find the request that fails, alone; the others go on
                try:
                    row_logits = self._forward([seq])[0]
                except Exception as e:
                    with engine._cv:
                        engine._retire(seq, "error", e)
                    continue
            else:
                row_logits = logits[i]
            seq.cached = len(seq.ids)
            if not seq.request.cancel_requested:
                engine._accept_token(seq, row_logits[None])

    def _admit(self) -> None:
        engine, pool = self.engine, self.pool
        while engine._waiting and len(engine._running) < engine.max_batch_size:
            seq = engine._waiting[0]
            hit = self._lookup(seq) if not seq.blocks else 0
            need = pool.blocks_for(len(seq.ids)) - len(seq.blocks)
            # keep a block per running request for its growth, so admitting does not force a preemption
            if pool.num_free < need + (len(engine._running) if engine._running else 0):
                self.release(seq, keep_prefix=False)
                return
            seq.blocks += pool.allocate(need)
            engine._waiting.popleft()
            engine._running.append(seq)
            seq.request._scheduled()
            if hit and not seq.hit_tokens:
                engine._counters["prefix_cache_hits"] += 1
                engine._counters["prefix_cache_hit_tokens"] += hit
            seq.hit_tokens = seq.hit_tokens or hit

    def _lookup(self, seq) -> int:
        """Take the longest cached prefix of the sequence's tokens (keeping at least one token to run); returns
        the tokens found."""
        keys = block_keys(seq.ids[:len(seq.ids) - 1], self.pool.block_size, seq.image_spans, seq.image_keys)
        seq.blocks = self.pool.lookup(keys)
        seq.cached = len(seq.blocks) * self.pool.block_size
        return seq.cached

    def _grow_blocks(self) -> None:
        """Every running sequence gets the blocks for the tokens it runs next; when the pool is out, the youngest
        request is preempted (its full blocks stay in the prefix cache, the rest is recomputed when readmitted)."""
        engine, pool = self.engine, self.pool
        for seq in list(engine._running):
            if seq not in engine._running:
                continue
            need = pool.blocks_for(len(seq.ids)) - len(seq.blocks)
            while need > 0:
                blocks = pool.allocate(need)
                if blocks is not None:
                    seq.blocks += blocks
                    break
                victim = engine._running[-1]
                engine._running.remove(victim)
                self.release(victim, keep_prefix=True)
                engine._waiting.appendleft(victim)
                engine._counters["preemptions"] += 1
                if victim is seq:
                    break

    @staticmethod
    def _images_to_feed(seq) -> list:
        """(image index, first uncached feature) of each image with tokens still to run."""
        return [(i, max(0, seq.cached - start)) for i, (start, end) in enumerate(seq.image_spans) if end > seq.cached]

    def _image_features(self, rows):
        """Projected features of the image tokens the rows run next, (tokens, hidden), in token order, or None.
        Images not in the feature cache go through the vision tower together, once each."""
        wanted = [(seq, i, first) for seq in rows for i, first in self._images_to_feed(seq)]
        if not wanted:
            return None
        missing = {}
        for seq, i, _ in wanted:
            key = seq.image_keys[i]
            if key in self._features:
                self._features.move_to_end(key)
            else:
                missing.setdefault(key, seq.pixels[i])
        if missing:
            pixels = list(missing.values())
            encoded = self.model.encode_images(pixels if self.config.vision.dynamic_resolution
                                               else torch.stack(pixels))
            counts = [self.config.vision.tokens_per_image(p.shape[-2], p.shape[-1]) for p in pixels]
            for key, features in zip(missing, encoded.split(counts)):
                self._features[key] = features
            while len(self._features) > max(self.FEATURE_CACHE_IMAGES, len(missing)):
                self._features.popitem(last=False)
        return torch.cat([self._features[seq.image_keys[i]][first:] for seq, i, first in wanted])

    @torch.no_grad()
    def _forward(self, rows) -> torch.Tensor:
        """One forward over the rows' uncached tokens; (rows, vocab) fp32 logits at each row's last token."""
        new = [seq.ids[seq.cached:] for seq in rows]
        width = max(len(n) for n in new)
        input_ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        slots = torch.zeros(len(rows), width, dtype=torch.bool)  # the prompt's image slots, never generated ids
        for r, (seq, ids) in enumerate(zip(rows, new)):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            for start, end in seq.image_spans:
                slots[r, max(0, start - seq.cached):max(0, end - seq.cached)] = True
        features = self._image_features(rows)
        self.cache.bind([seq.blocks for seq in rows], [seq.cached for seq in rows])
        return self.model._last_logits(input_ids.to(self.device), None, mask.to(self.device), self.cache,
                                       image_features=features, image_slots=slots.to(self.device))

"""The torch backend's scheduler step: continuous batching over a `PagedKVCache` with prefix reuse.

One step: admit waiting requests while slots and blocks allow (first looking their prompt up in the prefix cache),
give every running request the blocks its next tokens need (preempting the youngest when the pool is full), run
one forward of `GMAIVL` over all of them (new prompts packed with single decode tokens) and hand each request's
last-position logits to the engine, which picks and streams the token."""
from __future__ import annotations

import torch

from gmaivl_rt.errors import LimitError
from gmaivl_rt.paged_cache import PagedKVCache, block_keys


class TorchStepper:
    def __init__(self, engine, block_size: int, kv_cache_tokens: int | None):
        self.engine = engine
        self.model = engine.backend.model
        self.config = self.model.config
        weight = self.model.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        if kv_cache_tokens is None:
            kv_cache_tokens = engine.max_batch_size * min(1024, self.config.text.max_position_embeddings)
        num_blocks = -(-int(kv_cache_tokens) // block_size)
        if num_blocks < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {kv_cache_tokens}")
        self.cache = PagedKVCache(self.config, num_blocks, block_size, self.dtype, self.device)
        self.pool = self.cache.pool

    # ------------------------------------------------------------------ engine hooks
    def block_stats(self) -> dict:
        return {"kv_blocks_used": self.pool.num_used, "kv_blocks_free": self.pool.num_free,
                "kv_blocks_cached": self.pool.num_cached, "kv_block_size": self.pool.block_size}

    def make_sequence(self, request, prepared):
        from gmaivl_rt.engine import sequence_from_request

        seq = sequence_from_request(request, prepared, self.config.text, self.config.image_token_index,
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
        for group in self._groups(rows):
            try:
                logits = self._forward(group)
            except Exception:
                if len(group) == 1:
                    raise
                logits = None
            for i, seq in enumerate(group):
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
            if hit and not seq.hit_tokens:
                engine._counters["prefix_cache_hits"] += 1
                engine._counters["prefix_cache_hit_tokens"] += hit
            seq.hit_tokens = seq.hit_tokens or hit

    def _lookup(self, seq) -> int:
        """Take the longest cached prefix of the sequence's tokens (keeping at least one token to run, and never
        ending inside an image); returns the tokens found."""
        bs = self.pool.block_size
        keys = block_keys(seq.ids[:len(seq.ids) - 1], bs, seq.image_spans, seq.image_keys)
        blocks = self.pool.lookup(keys)
        matched = len(blocks) * bs
        for start, end in seq.image_spans:
            if start < matched < end:  # image features come whole from the vision tower
                matched = start // bs * bs
        self.pool.release(blocks[matched // bs:])
        seq.blocks, seq.cached = blocks[:matched // bs], matched
        return matched

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

    def _groups(self, rows):
        """Usually one forward. A generated image-token id fed back while new images are encoded in the same
        forward would be taken for an image position, so such steps run decode and prefill apart."""
        image_id = self.config.image_token_index
        has_images = any(self._new_pixels(seq) for seq in rows)
        if has_images and any(seq.cached and seq.ids[-1] == image_id for seq in rows):
            return [[s for s in rows if not s.cached or s.ids[-1] != image_id],
                    [s for s in rows if s.cached and s.ids[-1] == image_id]]
        return [rows]

    @staticmethod
    def _new_pixels(seq) -> list:
        return [p for p, (start, _) in zip(seq.pixels, seq.image_spans) if start >= seq.cached]

    @torch.no_grad()
    def _forward(self, rows) -> torch.Tensor:
        """One forward over the rows' uncached tokens; (rows, vocab) fp32 logits at each row's last token."""
        new = [seq.ids[seq.cached:] for seq in rows]
        width = max(len(n) for n in new)
        input_ids = torch.zeros(len(rows), width, dtype=torch.int64)
        mask = torch.zeros(len(rows), width, dtype=torch.int64)
        for r, ids in enumerate(new):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
        pixels = [p for seq in rows for p in self._new_pixels(seq)]
        pixel_values = None
        if pixels:
            pixel_values = pixels if self.config.vision.dynamic_resolution else torch.stack(pixels)
        self.cache.bind([seq.blocks for seq in rows], [seq.cached for seq in rows])
        return self.model._last_logits(input_ids.to(self.device), pixel_values, mask.to(self.device), self.cache)

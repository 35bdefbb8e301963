"""The graph backends' scheduler step (onnx, tensorrt): static batching.

The requests waiting when a batch starts run together, left-padded, through the backend's graphs as
`GraphBackend.generate` runs them (prefill, then one token per step over the graphs' own KV cache); each step is one
scheduler iteration, so streaming, cancellation and retiring work as on the torch backend. Rows that finished or
were cancelled are fed padding until the whole batch is done; requests arriving meanwhile wait for the next batch."""
from __future__ import annotations

import torch


class GraphStepper:
    def __init__(self, engine):
        self.engine, self.backend = engine, engine.backend
        self.config = self.backend.config
        self._batch = None

    def block_stats(self) -> dict:
        """Graph backends keep their KV cache inside the graphs' state: no paged blocks."""
        return dict.fromkeys(("kv_blocks_used", "kv_blocks_free", "kv_blocks_cached", "kv_blocks_peak",
                              "kv_block_size", "kv_block_bytes"), 0)

    def make_sequence(self, request, prepared, engine_options):
        from gmaivl_rt.engine import sequence_from_request

        return sequence_from_request(request, prepared, engine_options, self.config.text, self.config.image_token_index,
                                     self.config.vision.tokens_per_image)

    def release(self, seq, keep_prefix: bool) -> None:
        """Nothing to free per request: the batch's cache goes when the batch ends."""

    @torch.no_grad()
    def step(self) -> None:
        engine = self.engine
        if self._batch is not None and not any(seq in engine._running for seq in self._batch["rows"]):
            self._batch = None
        if self._batch is None:
            with engine._cv:
                rows = []
                while engine._waiting and len(rows) < engine.max_batch_size:
                    rows.append(engine._waiting.popleft())
                    rows[-1].request._scheduled()
                engine._running.extend(rows)
            if rows:
                self._prefill(rows)
            return
        self._decode()

    def _prefill(self, rows) -> None:
        width = max(len(seq.ids) for seq in rows)
        ids = torch.full((len(rows), width), rows[0].stop.pad, dtype=torch.int64)
        mask = torch.zeros_like(ids)
        for r, seq in enumerate(rows):
            ids[r, width - len(seq.ids):] = torch.tensor(seq.ids)
            mask[r, width - len(seq.ids):] = 1
        pixels = [p for seq in rows for p in seq.pixels] or None
        try:
            logits, state = self.backend.prefill(ids, mask, pixels)
        except Exception as e:  # a static batch fails together; its requests say why
            with self.engine._cv:
                for seq in rows:
                    self.engine._retire(seq, "error", e)
            return
        self._batch = {"rows": rows, "state": state}
        self._accept(logits)

    def _decode(self) -> None:
        rows = self._batch["rows"]
        tokens = torch.tensor([seq.ids[-1] if seq in self.engine._running else seq.stop.pad for seq in rows])
        self._accept(self.backend.advance(self._batch["state"], tokens))

    def _accept(self, logits) -> None:
        for r, seq in enumerate(self._batch["rows"]):
            if seq in self.engine._running and not seq.request.cancel_requested:
                self.engine._accept_token(seq, logits[r:r + 1].float())

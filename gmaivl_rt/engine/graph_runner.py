"""The graph backends' model runner (onnx, tensorrt): static batches through the backend's exported graphs.

A "prefill" batch (a new static batch, as the scheduler in gmaivl_rt/engine/scheduler.py forms it) runs its
prompts left-padded (`gmaivl_rt.runtime.batching.left_padded_batch`) through `GraphBackend.prefill`, the same
step `GraphBackend.generate` starts with; each "decode" batch feeds one token per row through
`GraphBackend.advance`, over the graphs' own KV cache, which this runner keeps until the next prefill. Inactive
rows (finished or cancelled) are fed padding. The runner decides nothing and touches no queue."""
from __future__ import annotations

import torch

from gmaivl_rt.runtime.batching import left_padded_batch


class GraphRunner:
    """backend: a GraphBackend (OnnxBackend, TensorRTBackend)."""

    block_bytes = 0  # the graphs keep their KV cache in their own state: no paged blocks
    device = dtype = None  # ids and pixels stay on the CPU, where the backend takes them

    def __init__(self, backend):
        self.backend = backend
        self._state = None  # the static batch's step state (mask, positions, the graphs' cache)

    @torch.no_grad()
    def run(self, batch) -> torch.Tensor:
        """Returns (rows, vocab) float32 logits at each row's last token (an inactive row's are meaningless)."""
        rows = batch.seqs
        if batch.phase == "prefill":
            ids, mask = left_padded_batch([seq.ids for seq in rows], rows[0].stop.pad)
            # the rows' images in row order, as a list: the backend encodes a list image by image
            pixels = [p for seq in rows for p in seq.pixels] or None
            self._state = None
            logits, self._state = self.backend.prefill(ids, mask, pixels)
        else:
            tokens = torch.tensor([seq.ids[-1] if active else seq.stop.pad for seq, active in zip(rows, batch.active)])
            logits = self.backend.advance(self._state, tokens)
        return logits.float()

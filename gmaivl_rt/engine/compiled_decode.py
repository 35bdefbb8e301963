"""The torch runner's compiled decode step: a batch in which every row feeds one token (the steady state of serving)
runs through `torch.compile` (Inductor: C++ on CPU, Triton on CUDA) instead of the eager model; so does a short
text-only prefill (a follow-up question after its cached image), each of its tokens a decode row
(gmaivl_rt/engine/torch_runner.py).

What is compiled is the model's own decoder, unchanged (`GMAIVL.language_model` layers, final norm, `lm_head`): the
rows' tokens are embedded, their rotary cos/sin computed (eagerly, outside), and the layers run over a
`PagedKVCache` that stores each token's key/value and attends through the paged decode op (on the CPU
`paged_cache.grouped_decode_attention`, which Inductor fuses into the step). The cache is given
`DecodeRows`, tensors only, so nothing in the graph depends on Python lists that change every step. Batch sizes are
bucketed (rows padded to the next bucket; a padding row writes into the cache's scratch slot and reads one
position), and the block-table width is a dynamic dimension, so a few graphs serve every step.

On by default for CUDA and CPU models (on the CPU since 2026-12-07: 16 requests 1.43-1.70x the eager engine,
docs/engine.md); `GMAIVL_COMPILE=1|0` or `Engine(compile=True|False)` decides. The eager path stays the reference:
the compiled step is tested against it (greedy tokens equal, logits within fp32 reordering)."""
from __future__ import annotations

import logging
import os
import time
import warnings
import torch

from gmaivl_rt.engine.paged_cache import DecodeRows
from gmaivl_rt.model import ops

log = logging.getLogger("gmaivl_rt.engine")

COMPILE_ENV = "GMAIVL_COMPILE"


def compile_wanted(option: bool | None, device) -> bool:
    """The engine's compile switch: the option when given, else GMAIVL_COMPILE (1/true/on/yes, 0/false/off/no),
    else on for a CUDA or CPU model (Inductor's Triton and C++ backends; on this 2-core CPU 16 requests ran
    1.43-1.70x the eager engine after a warm-up of 11-88 s: docs/engine.md) and off for any other device."""
    if option is not None:
        return bool(option)
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    return value in ("1", "true", "on", "yes") or torch.device(device).type in ("cuda", "cpu")


# the default buckets reach this many rows whatever max_batch_size: a short text prefill runs as one decode row per
# token (torch_runner.py), and a follow-up question after its cached image feeds ~13 (docs/engine.md)
PREFILL_ROWS = 16


def buckets_for(max_batch_size: int) -> list[int]:
    """Batch sizes a graph is compiled for: powers of two below max_batch_size, max_batch_size, and PREFILL_ROWS
    where that is larger."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return sorted({*sizes, max_batch_size, PREFILL_ROWS})


class CompiledDecode:
    """model: a GMAIVL; cache: the runner's PagedKVCache; buckets: batch sizes to compile (each warmed up by
    `warm_up`); backend: torch.compile's (Inductor by default). `run(...)` returns (rows, vocab) fp32 logits, or None once compiling has failed (the runner then
    runs eagerly; the failure was warned about once, naming its cause)."""

    BACKEND = "inductor"

    def __init__(self, model, cache, buckets: list[int]):
        self.model, self.cache, self.buckets = model, cache, sorted(buckets)
        self.failed: str | None = None
        backend = type(self).BACKEND
        # on the CPU Inductor's wrapper (the code calling the kernels, checking each input's size and stride, making
        # views) in C++ rather than Python: batch-1 decode 0.51-0.58x transformers against 0.56-0.66x, same run
        options = {"cpp_wrapper": True} if backend == "inductor" and torch.device(cache.device).type == "cpu" else None
        self._step = torch.compile(self._forward, dynamic=False, backend=backend, options=options)

    def _forward(self, ids, cos, sin, rows: DecodeRows):
        lm = self.model.language_model
        hidden = lm.embed_tokens(ids)
        for layer in lm.layers:
            hidden = layer(hidden, cos, sin, rows, self.cache)
        return self.model.lm_head(lm.norm(hidden)).float()

    # A prefill run as decode rows reads its sequence's cached keys/values once per row: on the CPU the attention
    # (paged_cache.grouped_decode_attention) gathers each row's whole block table. Up to this many positions
    # (bucket rows x table width) such a step beat the eager forward over the same tokens on the compact preset,
    # one thread (16 rows over 128 positions 3.7 ms against 5.1; 32 rows over 128 5.8 against 5.5; docs/engine.md;
    # measured with the paged reference attention, before the grouped one, which is faster over long tables)
    PREFILL_GATHER_POSITIONS = 2048

    def bucket(self, rows: int) -> int | None:
        """The smallest bucket holding `rows` rows, or None (more rows than the largest bucket)."""
        return next((b for b in self.buckets if b >= rows), None)

    def takes_prefill(self, rows: int, table_positions: int) -> bool:
        """Whether a batch with prefills expanded to `rows` decode rows, over block tables of `table_positions`
        positions, runs here rather than eagerly: it fits a bucket and gathers at most PREFILL_GATHER_POSITIONS."""
        size = self.bucket(rows)
        return size is not None and size * table_positions <= self.PREFILL_GATHER_POSITIONS

    @torch.no_grad()
    def run(self, ids, positions, block_tables, seqlens_after, store_index, *, max_position: int | None = None):
        """ids, positions: (B,) int64, the rows' new tokens and their positions; block_tables: (B, W) int32;
        seqlens_after: (B,) int32; store_index: (B,) int64 (see DecodeRows); max_position: the largest of
        `positions` where the caller knows it (else read from the tensor). Returns (B, vocab) fp32 logits, or
        None when this step is to run eagerly (compiling failed, or B is over the largest bucket)."""
        rows = ids.shape[0]
        size = self.bucket(rows)
        if self.failed is not None or size is None:
            return None
        pad = size - rows
        width = max(2, block_tables.shape[1])  # a width of 1 would be specialised: one more graph for nothing
        tables = torch.zeros(size, width, dtype=torch.int32, device=block_tables.device)
        tables[:rows, :block_tables.shape[1]] = block_tables
        if pad:  # padding rows: token 0 at position 0, stored in the scratch slot, attending to that one position
            ids = torch.cat([ids, ids.new_zeros(pad)])
            positions = torch.cat([positions, positions.new_zeros(pad)])
            seqlens_after = torch.cat([seqlens_after, seqlens_after.new_ones(pad)])
            store_index = torch.cat([store_index, store_index.new_full((pad,), self.cache.scratch_slot)])
        torch._dynamo.mark_dynamic(tables, 1)
        lm = self.model.language_model
        if max_position is None:
            max_position = int(positions.max())
        cos, sin = ops.rope_cos_sin(positions, lm.cfg.head_dim, lm.rope_theta(max_position),
                                    dtype=lm.embed_tokens.weight.dtype)
        try:
            logits = self._step(ids, cos, sin, DecodeRows(tables, seqlens_after, store_index))
        except Exception as error:  # a compiler missing or an op it cannot compile: eager from now on
            self._fail(error)
            return None
        return logits[:rows]

    def warm_up(self) -> None:
        """Compile every bucket now (the engine does it before serving: a request arriving meanwhile waits)."""
        device = self.cache.device
        started = time.perf_counter()
        for size in self.buckets:
            if self.failed is not None:
                return
            self.run(torch.zeros(size, dtype=torch.int64, device=device),
                     torch.zeros(size, dtype=torch.int64, device=device),
                     torch.zeros(size, 2, dtype=torch.int32, device=device),
                     torch.ones(size, dtype=torch.int32, device=device),
                     torch.full((size,), self.cache.scratch_slot, dtype=torch.int64, device=device))
        if self.failed is None:
            log.info("decode step compiled for batch sizes %s in %.1f s", list(self.buckets),
                     time.perf_counter() - started)

    def _fail(self, error: BaseException) -> None:
        while getattr(error, "inner_exception", None) or error.__cause__:  # torch.compile wraps the real cause
            error = getattr(error, "inner_exception", None) or error.__cause__
        text = str(error).strip()
        cause = f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
        self.failed = cause
        warnings.warn(f"the engine's compiled decode step is off, decoding runs eagerly: torch.compile failed "
                      f"({cause}); set {COMPILE_ENV}=0 to skip compiling", RuntimeWarning, stacklevel=2)
        log.warning("compiled decode step off, running eagerly: %s", cause)

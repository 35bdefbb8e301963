"""The scheduler: which sequences run next, and what becomes of them after each step.

It owns the waiting queue and the running list, the KV blocks (the `BlockPool` of block_pool.py that the torch
runner's `PagedKVCache` maps its tensors through: allocation, the prefix cache, preemption) and the engine's
counters. `schedule()` admits and returns the next
`Batch`; the runner runs it; `postprocess(batch, tokens)` appends each row's sampled token, streams the text and
retires finished sequences. Two ways to batch:

- paged (torch backend, a `BlockPool` given): continuous batching. Waiting sequences join while batch slots and
  KV blocks allow (their prompt first looked up in the prefix cache); every running sequence gets the blocks its
  next tokens need, the youngest being preempted when the pool is out (its full blocks stay in the prefix cache,
  the rest is recomputed when readmitted). A batch mixes new prompts and single decode tokens.
- static (graph backends, no pool): the sequences waiting when a batch starts run together until all are done
  (prefill, then one token per step); rows that finished or were cancelled are fed padding meanwhile.

Not thread-safe on its own: the engine calls it under its lock, from its scheduler thread (and `add` / `stats`
from others)."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from gmaivl_rt.engine.block_pool import BlockPool, block_contents, block_keys
from gmaivl_rt.engine.sequence import Sequence
from gmaivl_rt.errors import LimitError

BLOCK_STATS = ("kv_blocks_used", "kv_blocks_free", "kv_blocks_cached", "kv_blocks_peak", "kv_block_size")


@dataclass
class Batch:
    """What the runner runs next, one row per sequence in `seqs`.
    phase: "mixed" (paged: each row feeds its uncached tokens, seq.ids[seq.cached:], or with `feeds` the next
    feeds[row] of them), "prefill" (a new static batch: each row's whole prompt) or "decode" (the static batch in
    flight: each active row feeds its last token).
    active: per row, whether its logits are sampled this step: static batches keep finished rows, fed padding;
    a mixed row whose prompt is still being prefilled in chunks is inactive until its last chunk.
    block_tables: paged, (rows, max blocks) int32 CPU, each row's blocks in order (entries past its last block are
    valid but unused block ids), or None (the runner builds them from seq.blocks)."""
    seqs: list
    phase: str
    active: list
    block_tables: torch.Tensor | None = None
    slots: torch.Tensor | None = None  # (rows,) int64: each row's row in the scheduler's block table
    feeds: list | None = None  # mixed, chunked: per row the tokens it feeds this step (None: all its uncached)

    def __len__(self) -> int:
        return len(self.seqs)


def check_step_tokens(max_step_tokens, max_batch_size: int, paged: bool = True) -> None:
    """ValueError unless max_step_tokens is None or an integer >= max_batch_size (each running sequence feeds at
    least one token per step), and only for paged (torch backend) batching: static batches cannot be chunked."""
    if max_step_tokens is None:
        return
    if isinstance(max_step_tokens, bool) or not isinstance(max_step_tokens, int):
        raise ValueError(f"max_step_tokens must be an integer (tokens one engine step feeds) or None, "
                         f"got {max_step_tokens!r}")
    if max_step_tokens < max_batch_size:
        raise ValueError(f"max_step_tokens ({max_step_tokens}) must be >= max_batch_size ({max_batch_size}): "
                         f"every running request feeds at least one token per step")
    if not paged:
        raise ValueError("max_step_tokens (chunked prefill) needs the torch backend's paged KV cache; the graph "
                         "backends (onnx, tensorrt) run each static batch's prompts whole")


class Scheduler:
    """max_batch_size: sequences run together; pool: the KV block pool (paged batching), or None (static
    batching); tokenizer: decodes the streamed text; max_blocks_per_sequence: the most blocks one sequence can hold
    (its context; default the whole pool); max_step_tokens: paged only, the most tokens one step feeds (chunked
    prefill; None: no budget, every prompt runs whole in one step), at least max_batch_size (`check_step_tokens`);
    copy_tokens: paged only, `copy_tokens(source block, target block, count)` copies the keys/values of a block's
    first `count` tokens in the KV cache (`PagedKVCache.copy_tokens`): with it, a prompt that departs from a cached
    one inside a block reuses the shared tokens of that block too (None: whole blocks only).

    Per step the paged scheduler's work follows what changed: the block table (one row per running sequence, a
    slot) is written where a sequence gets blocks, and the batch is made again only when the running set changes;
    an ordinary decode step reuses both (one index into the table)."""

    def __init__(self, max_batch_size: int, pool: BlockPool | None, tokenizer,
                 max_blocks_per_sequence: int | None = None, max_step_tokens: int | None = None,
                 copy_tokens=None):
        check_step_tokens(max_step_tokens, max_batch_size, paged=pool is not None)
        self.max_batch_size, self.pool, self.tokenizer = max_batch_size, pool, tokenizer
        self.copy_tokens = copy_tokens
        self.max_step_tokens = max_step_tokens
        self._prefilling: dict = {}  # running sequences with more than one token to run, in admission order
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._running_set: set = set()
        self._batch: Batch | None = None  # the paged batch of the current running set (None: to be made again)
        if pool is not None:
            width = pool.num_blocks if max_blocks_per_sequence is None else min(pool.num_blocks,
                                                                                max_blocks_per_sequence)
            self.block_table = torch.zeros(max_batch_size, width, dtype=torch.int32)
            self._free_slots = list(range(max_batch_size - 1, -1, -1))
        self.counters = {"generated_tokens": 0, "prompt_tokens": 0, "prefix_cache_hits": 0,
                         "prefix_cache_hit_tokens": 0, "preemptions": 0, "finished": 0}
        self._static: list[Sequence] | None = None  # the static batch in flight

    # ------------------------------------------------------------------ queue
    def check_fits(self, seq: Sequence) -> None:
        """LimitError when the sequence could never fit the KV pool, even alone (reads only the pool's size)."""
        if self.pool is not None:
            # the last token is never fed, so prompt + max_new_tokens - 1 positions need keys/values
            needed = self.pool.blocks_for(seq.prompt_len + seq.max_new_tokens - 1)
            if needed > self.pool.num_blocks:
                raise LimitError(f"the request needs {needed} KV blocks ({seq.prompt_len} prompt tokens + "
                                 f"max_new_tokens {seq.max_new_tokens}) but the engine's cache holds "
                                 f"{self.pool.num_blocks} (kv_cache_tokens)")

    def add(self, seq: Sequence) -> None:
        """Queue a sequence (checked by `check_fits`)."""
        self.counters["prompt_tokens"] += seq.prompt_len
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def cancel_all(self) -> None:
        for seq in [*self.waiting, *self.running]:
            seq.request.cancel_requested = True

    def stats(self) -> dict:
        """running, waiting, the block counts (zeros when static) and the counters."""
        pool = self.pool
        blocks = dict.fromkeys(BLOCK_STATS, 0) if pool is None else {
            "kv_blocks_used": pool.num_used, "kv_blocks_free": pool.num_free, "kv_blocks_cached": pool.num_cached,
            "kv_blocks_peak": pool.peak_used, "kv_block_size": pool.block_size}
        return {"running": len(self.running), "waiting": len(self.waiting), **blocks, **self.counters}

    # ------------------------------------------------------------------ before a step
    def schedule(self) -> Batch | None:
        """Drop cancelled sequences, admit, and return the next batch (None: nothing to run)."""
        self._drop_cancelled()
        if self.pool is None:
            return self._schedule_static()
        self._admit()
        self._grow_blocks()
        if not self.running:
            return None
        if self._batch is None:
            rows = list(self.running)
            self._batch = Batch(rows, "mixed", [True] * len(rows),
                                slots=torch.tensor([seq.slot for seq in rows], dtype=torch.int64))
        batch = self._batch
        batch.block_tables = self.block_table[batch.slots, :max(len(seq.blocks) for seq in batch.seqs)]
        if self.max_step_tokens is not None and self._prefilling:
            return self._chunk(batch)
        return batch

    def _chunk(self, batch: Batch) -> Batch:
        """The batch within the step's token budget. Every decode row feeds its one token; the prompts being
        prefilled share the rest first come, first served, each feeding at least one token (so no row waits a
        step out: the budget is at least max_batch_size). A prompt's chunk may end inside an image's tokens: the
        runner projects the image once and feeds the slice of its features the chunk covers. A row is sampled
        (active) only on the step that feeds its prompt's last token."""
        prefilling = self._prefilling
        left = self.max_step_tokens - (len(batch) - len(prefilling))
        uncached = {seq: len(seq.ids) - seq.cached for seq in prefilling}
        if sum(uncached.values()) <= left:
            return batch  # everything fits: the plain batch, every prompt whole
        chunks, later = {}, len(prefilling)
        for seq, count in uncached.items():
            later -= 1
            chunks[seq] = min(count, left - later)  # one token kept for each later prompt
            left -= chunks[seq]
        feeds = [chunks.get(seq, 1) for seq in batch.seqs]
        active = [chunks.get(seq) is None or chunks[seq] == uncached[seq] for seq in batch.seqs]
        return Batch(batch.seqs, "mixed", active, batch.block_tables, batch.slots, feeds)

    def _set_running(self, seq: Sequence, running: bool) -> None:
        """Add a sequence to the running list (at the end) or take it out; the next batch is made again."""
        if running:
            self.running.append(seq)
            self._running_set.add(seq)
            if len(seq.ids) - seq.cached > 1:
                self._prefilling[seq] = None
        else:
            self.running.remove(seq)
            self._running_set.discard(seq)
            self._prefilling.pop(seq, None)
        self._batch = None

    def _table_blocks(self, seq: Sequence, start: int) -> None:
        """Write the sequence's blocks from `start` on into its block-table row (taking a row if it has none)."""
        if seq.slot is None:
            seq.slot, start = self._free_slots.pop(), 0
        if len(seq.blocks) > start:
            self.block_table[seq.slot, start:len(seq.blocks)] = torch.tensor(seq.blocks[start:], dtype=torch.int32)

    def _drop_cancelled(self) -> None:
        for seq in [s for s in self.waiting if s.cancelled]:
            self.waiting.remove(seq)
            self.retire(seq, "cancelled")
        for seq in [s for s in self.running if s.cancelled]:
            self.retire(seq, "cancelled")

    def _schedule_static(self) -> Batch | None:
        if self._static is not None and any(seq in self._running_set for seq in self._static):
            return Batch(self._static, "decode", [seq in self._running_set for seq in self._static])
        rows = []
        while self.waiting and len(rows) < self.max_batch_size:
            rows.append(self.waiting.popleft())
            rows[-1].mark_scheduled()
            self._set_running(rows[-1], True)
        self._static = rows or None
        return Batch(rows, "prefill", [True] * len(rows)) if rows else None

    def _admit(self) -> None:
        pool = self.pool
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting[0]
            looked_up = not seq.blocks
            hit, last_key = self._lookup(seq) if looked_up else (0, b"")
            need = pool.blocks_for(len(seq.ids)) - len(seq.blocks)
            # keep a block per running sequence for its growth, so admitting does not force a preemption
            if pool.num_free < need + len(self.running):
                self._free_blocks(seq, keep_prefix=False)
                return
            seq.blocks += pool.allocate(need)
            if looked_up:
                hit += self._reuse_partial_block(seq, last_key)
            self.waiting.popleft()
            self._set_running(seq, True)
            self._table_blocks(seq, 0)
            seq.mark_scheduled()
            if hit and not seq.hit_tokens:
                self.counters["prefix_cache_hits"] += 1
                self.counters["prefix_cache_hit_tokens"] += hit
            seq.hit_tokens = seq.hit_tokens or hit

    def _lookup(self, seq: Sequence) -> tuple[int, bytes]:
        """Take the longest cached prefix of the sequence's tokens (keeping at least one token to run); returns
        the tokens found and the key of the last block found (b"" for none: the next block's parent)."""
        keys = block_keys(seq.ids[:len(seq.ids) - 1], self.pool.block_size, seq.image_spans, seq.image_keys)
        seq.blocks = self.pool.lookup(keys)
        seq.cached = len(seq.blocks) * self.pool.block_size
        return seq.cached, keys[len(seq.blocks) - 1] if seq.blocks else b""

    def _reuse_partial_block(self, seq: Sequence, parent: bytes) -> int:
        """After the whole cached blocks (seq.cached tokens; `parent`: the last one's key, from `_lookup`), the
        leading tokens of the sequence's next block that a cached block holds after the same prefix (a follow-up
        question departs from the first inside a block): their keys/values are copied into the sequence's own block
        (its blocks already allocated), at least one token is left to run. Returns the tokens reused."""
        if self.copy_tokens is None:
            return 0
        size, start = self.pool.block_size, seq.cached
        end = min(start + size, len(seq.ids) - 1)
        if end <= start or start % size:
            return 0
        index = start // size
        source, count = self.pool.longest_partial(
            parent, block_contents(seq.ids, start, end, seq.image_spans, seq.image_keys))
        if source is None:
            return 0
        self.copy_tokens(source, seq.blocks[index], count)
        seq.cached += count
        return count

    def _grow_blocks(self) -> None:
        """Every running sequence gets the blocks for the tokens it runs next; when the pool is out, the youngest
        is preempted (its full blocks stay in the prefix cache, the rest is recomputed when readmitted)."""
        pool = self.pool
        growing = [seq for seq in self.running if pool.blocks_for(len(seq.ids)) > len(seq.blocks)]
        for seq in growing:  # most steps: none, or the few that cross into a new block
            if seq not in self._running_set:  # preempted meanwhile
                continue
            need = pool.blocks_for(len(seq.ids)) - len(seq.blocks)
            while need > 0:
                blocks = pool.allocate(need)
                if blocks is not None:
                    seq.blocks += blocks
                    self._table_blocks(seq, len(seq.blocks) - len(blocks))
                    break
                victim = self.running[-1]
                self._set_running(victim, False)
                self._free_blocks(victim, keep_prefix=True)
                self.waiting.appendleft(victim)
                self.counters["preemptions"] += 1
                if victim is seq:
                    break

    # ------------------------------------------------------------------ after a step
    def wants_token(self, seq: Sequence) -> bool:
        """Whether a row's logits are to be sampled: it still runs and was not cancelled meanwhile."""
        return seq in self._running_set and not seq.cancelled

    def postprocess(self, batch: Batch, tokens: list) -> None:
        """tokens: per row, the sampled id (int), or None for rows not sampled (inactive, cancelled, failed).
        Appends each token, streams the text of the rows that stream every step (`Sequence.streams_each_step`; the
        others' text is decoded once, when they retire), and retires the sequences that are done: an eos ("stop", as
        the decoding step flagged it in seq.eos), a stop string in the text ("stop"), or max_new_tokens
        ("length")."""
        for r, (seq, token) in enumerate(zip(batch.seqs, tokens)):
            if seq not in self._running_set:  # retired during the step (it failed)
                continue
            if batch.phase == "mixed":  # the runner stored the keys/values of every token it fed
                seq.cached = len(seq.ids) if batch.feeds is None else seq.cached + batch.feeds[r]
                if seq.cached >= len(seq.ids):
                    self._prefilling.pop(seq, None)
            if token is None or seq.cancelled:
                continue
            try:
                self._advance(seq, token)
            except Exception as error:  # a row that cannot go on (e.g. its text cannot be decoded) fails alone
                self.retire(seq, "error", error)

    def _advance(self, seq: Sequence, token: int) -> None:
        """Append one sampled token, stream the new text and retire the sequence if it is done."""
        seq.append_token(token)
        self.counters["generated_tokens"] += 1
        reason = "stop" if seq.eos else ("length" if len(seq.generated) >= seq.max_new_tokens else None)
        if reason is None and seq.streams_each_step and seq.stream_text(self.tokenizer, final=False):
            reason = "stop"
        if reason is not None:
            self.retire(seq, reason)

    def retire(self, seq: Sequence, reason: str, error: BaseException | None = None) -> None:
        """Take a sequence out of the running list, return its blocks (a finished one's full blocks join the
        prefix cache), flush its text and finish its request: "stop" | "length" | "cancelled" | "error"."""
        if seq in self._running_set:
            self._set_running(seq, False)
        self._free_blocks(seq, keep_prefix=reason in ("stop", "length"))
        if reason in ("stop", "length", "cancelled"):
            try:
                seq.stream_text(self.tokenizer, final=True)
            except Exception as decode_error:  # its text cannot be decoded (a row nobody streamed finds it here)
                reason, error = "error", decode_error
        self.counters["finished"] += 1
        seq.finish(reason, error)

    def fail_running(self, error: BaseException) -> None:
        """A failure outside any one sequence: every running sequence ends with it."""
        for seq in list(self.running):
            self.retire(seq, "error", error)

    def _free_blocks(self, seq: Sequence, keep_prefix: bool) -> None:
        """Return a sequence's blocks; with keep_prefix its full blocks join the prefix cache first."""
        if self.pool is None:
            return  # static batches keep their cache inside the graphs' state, freed with the batch
        if keep_prefix:
            size = self.pool.block_size
            keys = block_keys(seq.ids[:seq.cached], size, seq.image_spans, seq.image_keys)
            for index, block in enumerate(seq.blocks[:-(-seq.cached // size)]):
                start = index * size
                contents = block_contents(seq.ids, start, min(start + size, seq.cached), seq.image_spans,
                                          seq.image_keys)
                self.pool.register(keys[index] if index < len(keys) else None, block,
                                   keys[index - 1] if index else b"", contents)
        self.pool.release(seq.blocks)
        seq.blocks, seq.cached = [], 0
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

"""A paged KV cache for the serving engine (vLLM's PagedAttention layout): the key/value tensors the torch runner
(gmaivl_rt/engine/torch_runner.py) writes and reads.

Keys and values of every layer live in one pool of fixed-size blocks, (num_blocks, block_size, kv_heads, head_dim);
each sequence owns a list of blocks (its block table), so memory follows the tokens in use. `PagedKVCache`
implements the same `attend`/`advance` contract as `gmaivl_rt.model.modeling.KVCache`, so the model runs over it
unchanged: the runner `bind`s the block tables and cached lengths of the sequences in the next forward, and the
model's TokenBatch rows and slots are mapped through the tables. Which blocks a sequence holds is the scheduler's
business, through the cache's `BlockPool` (gmaivl_rt/engine/block_pool.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from gmaivl_rt.engine.block_pool import BlockPool
from gmaivl_rt.model import ops
from gmaivl_rt.model.modeling import attend_after_prefix


@dataclass
class DecodeRows:
    """What a forward in which every row feeds one token needs from the cache, as tensors only (the compiled decode
    step, gmaivl_rt/engine/compiled_decode.py, passes it where the eager model passes its TokenBatch): block_tables
    (B, W) int32; seqlens_after (B,) int32, positions each row holds once its new token is stored; store_index (B,)
    int64, where each row's new key/value goes in a layer's pool seen as (blocks * block_size, Hkv, D)."""
    block_tables: torch.Tensor
    seqlens_after: torch.Tensor
    store_index: torch.Tensor


def _store_rows(pool, index, rows) -> None:
    """The compiled decode step's store of each row's new key/value (pool (blocks, block_size, Hkv, D), index (B,)
    int64 slots of the pool seen as (blocks * block_size, Hkv, D), rows (B, Hkv, D)), in place. On the CPU as
    `index_put_` in the graph: Inductor writes the B rows into the pool where it lies (no copy of the pool), inside
    its own C++ kernel; the registered op (`ops.store_kv`) cost a call through torch.library's Python dispatch each
    time, ~0.1 ms, 8 a step on the compact preset (issue 29, batch-1 decode). Elsewhere the registered op, as
    compiled and checked on the GPU."""
    if pool.device.type == "cpu":
        pool.view(-1, *pool.shape[2:]).index_put_((index,), rows.to(pool.dtype))
    else:
        ops.store_kv(pool, index, rows)


def grouped_decode_attention(q, k_pool, v_pool, block_tables, seqlens_after):
    """The compiled decode step's attention on the CPU: q (B, H, D), one query per row; k_pool, v_pool (blocks,
    block_size, Hkv, D); block_tables (B, W) int32; seqlens_after (B,) int32 >= 1, the positions each row attends
    to. Returns (B, H, D) in q's dtype: the softmax(q k^T / sqrt(D)) v of `ops.paged_decode_attention`, each kv
    head's keys read once for its group of query heads (not copied per query head) and the scores in fp32. Plain
    multiply-and-sum tensor ops, so that Inductor fuses the gather, scores, softmax and weighted sum into two C++
    loops of the step: the reference's scaled_dot_product_attention, one query a row and its keys repeated per head,
    was about 1.0 of a 2.5 ms 16-row step (compact preset, one thread; einsum instead made Inductor copy the gathered
    keys element by element into a transposed layout, 1.6 ms; issue 29, docs/engine.md)."""
    rows, heads, dim = q.shape
    kv_heads = k_pool.shape[2]
    width = block_tables.shape[1] * k_pool.shape[1]
    tables = block_tables.long().flatten()
    keys = k_pool.index_select(0, tables).view(rows, width, kv_heads, 1, dim).float()
    values = v_pool.index_select(0, tables).view(rows, width, kv_heads, 1, dim).float()
    grouped = q.float().view(rows, 1, kv_heads, heads // kv_heads, dim)
    scores = (grouped * keys).sum(-1) * dim ** -0.5  # (B, W, Hkv, G)
    past_end = torch.arange(width, device=q.device)[None, :] >= seqlens_after[:, None]  # (B, W)
    weights = scores.masked_fill(past_end[:, :, None, None], float("-inf")).softmax(1)
    return (weights[..., None] * values).sum(1).reshape(rows, heads, dim).to(q.dtype)


class PagedKVCache:
    """Per-layer key/value block pools (num_blocks, block_size, kv_heads, head_dim) and a BlockPool.
    Before each forward, `bind` the block tables and cached lengths of the sequences in it (one per input row)."""

    def __init__(self, cfg, num_blocks: int, block_size: int, dtype, device):
        t = cfg.text
        # one block more than the pool hands out: its first slot, `scratch_slot`, takes the keys/values of the
        # compiled step's padding rows, which no sequence ever reads
        shape = (num_blocks + 1, block_size, t.num_kv_heads, t.head_dim)
        self.scratch_slot = num_blocks * block_size
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size, self.device = block_size, device
        self.lengths, self.max_length, self.block_tables = [], 0, None
        self._stored_for, self._store_index = None, None

    @property
    def bytes_per_block(self) -> int:
        return 2 * len(self.keys) * self.keys[0][0].numel() * self.keys[0].element_size()

    def copy_tokens(self, source: int, target: int, count: int) -> None:
        """Copy the keys/values of block `source`'s first `count` tokens into block `target`, every layer (a prompt
        sharing them with a cached one: the scheduler's partial-block reuse, gmaivl_rt/engine/block_pool.py)."""
        for pool in (*self.keys, *self.values):
            pool[target, :count] = pool[source, :count]

    def bind(self, block_tables, cached_lengths: list[int]) -> None:
        """block_tables: per sequence, its blocks (enough for its cached and new tokens): lists of ints, or a
        (sequences, max blocks) int32 tensor (the scheduler's table; entries past a sequence's last block unused);
        cached_lengths: tokens each already holds."""
        if torch.is_tensor(block_tables):
            self.block_tables = block_tables.to(device=self.device, dtype=torch.int32)
        else:
            width = max(len(t) for t in block_tables)
            self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32,
                                             device=self.device)
        self.lengths, self.max_length = list(cached_lengths), self.block_tables.shape[1] * self.block_size
        self._stored_for, self._store_index = None, None

    def _token_index(self, batch):
        """(T,) int64: where each new token's key/value goes in a layer's pool seen as (blocks * block_size, ...);
        made once per forward, used by every layer."""
        if self._stored_for is not batch:
            blocks = self.block_tables[batch.cache_rows, batch.cache_slots // self.block_size].long()
            self._store_index = blocks * self.block_size + batch.cache_slots % self.block_size
            self._stored_for = batch
        return self._store_index

    def attend(self, layer: int, q, k, v, batch):
        """Store the new tokens' k/v in their blocks, then attend each new query to its sequence's cached and new
        keys: varlen attention for fresh prompts, the paged decode kernel for single tokens, and a gather for
        several tokens after a cached prefix."""
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(batch, DecodeRows):  # the compiled decode step: one token per row, tensors only
            _store_rows(keys, batch.store_index, k)
            _store_rows(values, batch.store_index, v)
            if keys.device.type == "cpu":
                return grouped_decode_attention(q, keys, values, batch.block_tables, batch.seqlens_after)
            return ops.paged_decode_attention(q, keys, values, batch.block_tables, batch.seqlens_after)
        index = self._token_index(batch)
        keys.view(-1, *keys.shape[2:]).index_copy_(0, index, k.to(keys.dtype))
        values.view(-1, *values.shape[2:]).index_copy_(0, index, v.to(values.dtype))
        starts, lengths = batch.cache_starts, batch.lengths
        if all(s == 0 for s in starts):
            return ops.attention(q, k, v, causal=True, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        if all(n == 1 for n in lengths):
            return ops.paged_decode_attention(q, keys, values, self.block_tables, batch.cache_seqlens_after)
        return self._attend_mixed(q, k, v, keys, values, batch)

    def _attend_mixed(self, q, k, v, keys, values, batch):
        out = torch.empty_like(q)
        bounds = batch.cu_seqlens.tolist()
        fresh = [r for r, (s, n) in enumerate(zip(batch.cache_starts, batch.lengths)) if s == 0 and n]
        if fresh:
            index = torch.cat([torch.arange(bounds[r], bounds[r + 1], device=q.device) for r in fresh])
            sizes = torch.tensor([batch.lengths[r] for r in fresh], device=q.device)
            cu = torch.nn.functional.pad(sizes.cumsum(0), (1, 0)).to(torch.int32)
            out[index] = ops.attention(q[index], k[index], v[index], causal=True, cu_seqlens=cu,
                                       max_seqlen=int(sizes.max()))
        single = [r for r, (s, n) in enumerate(zip(batch.cache_starts, batch.lengths)) if s and n == 1]
        if single:
            index = torch.tensor([bounds[r] for r in single], device=q.device)
            rows = torch.tensor(single, device=q.device)
            out[index] = ops.paged_decode_attention(q[index], keys, values, self.block_tables[rows],
                                                    batch.cache_seqlens_after[rows])
        for r, (s, n) in enumerate(zip(batch.cache_starts, batch.lengths)):
            if s and n > 1:  # several tokens after a cached prefix: gather this sequence's blocks
                total = s + n
                table = self.block_tables[r, :self.pool.blocks_for(total)].long()
                ks = keys.index_select(0, table).flatten(0, 1)[:total]
                vs = values.index_select(0, table).flatten(0, 1)[:total]
                out[bounds[r]:bounds[r + 1]] = attend_after_prefix(q[bounds[r]:bounds[r + 1]], ks, vs)
        return out

    def advance(self, lengths) -> None:
        self.lengths = [a + b for a, b in zip(self.lengths, lengths)]

"""A paged KV cache for the serving engine (vLLM's PagedAttention layout) and the block bookkeeping behind it.

Keys and values of every layer live in one pool of fixed-size blocks, (num_blocks, block_size, kv_heads, head_dim);
each sequence owns a list of blocks (its block table), so memory follows the tokens in use. `PagedKVCache`
implements the same `attend`/`advance` contract as `gmaivl_rt.model.KVCache`, so `GMAIVL._decoder` runs over it
unchanged: the engine `bind`s the block tables and cached lengths of the sequences in the next forward, and the
model's TokenBatch rows and slots are mapped through the tables.

`BlockPool` counts references to blocks and keeps the full blocks of finished prompts in a prefix cache keyed by a
hash chain (`block_keys`): a block's key covers every token before it and the content hash of each image whose
tokens it holds, since all image tokens share one id. Unreferenced cached blocks stay until the space is needed
(least recently used first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import torch

from gmaivl_rt import ops


class BlockPool:
    """Which KV blocks are free, in use (reference counted) or cached for reuse."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refcount = [0] * num_blocks
        self.peak_used = 0
        self._free = deque(range(num_blocks))
        self._cached: dict[bytes, int] = {}          # prefix key -> block
        self._key_of: dict[int, bytes] = {}          # block -> prefix key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # cached blocks nobody uses, oldest first

    @property
    def num_free(self) -> int:
        """Blocks a new request can get: never used, or cached but unreferenced (evicted on demand)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int] | None:
        """`count` blocks with one reference each, or None (nothing taken) when fewer are free."""
        if count > self.num_free:
            return None
        blocks = []
        for _ in range(count):
            if self._free:
                block = self._free.popleft()
            else:  # evict the least recently used cached block
                block, _ = self._evictable.popitem(last=False)
                del self._cached[self._key_of.pop(block)]
            self.refcount[block] = 1
            blocks.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def release(self, blocks) -> None:
        for block in blocks:
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                if block in self._key_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)

    def lookup(self, keys) -> list[int]:
        """The cached blocks of the longest run of `keys` from the start, each with a new reference."""
        blocks = []
        for key in keys:
            block = self._cached.get(key)
            if block is None:
                break
            if self.refcount[block] == 0:
                del self._evictable[block]
            self.refcount[block] += 1
            blocks.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def register(self, key: bytes, block: int) -> None:
        """Offer a full, referenced block to the prefix cache under `key` (kept while referenced, then LRU)."""
        if key not in self._cached and block not in self._key_of:
            self._cached[key], self._key_of[block] = block, key


def block_keys(token_ids, block_size: int, image_spans=(), image_keys=()) -> list[bytes]:
    """One key per full block of `token_ids` (list of int): a hash of the previous block's key, the block's token
    ids and the content keys of the images whose token spans [start, end) overlap the block."""
    keys, previous = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        end = start + block_size
        h = hashlib.sha256(previous)
        h.update(torch.tensor(token_ids[start:end], dtype=torch.int64).numpy().tobytes())
        for (a, b), image_key in zip(image_spans, image_keys):
            if a < end and b > start:
                h.update(str(image_key).encode())
        previous = h.digest()
        keys.append(previous)
    return keys


class PagedKVCache:
    """Per-layer key/value block pools (num_blocks, block_size, kv_heads, head_dim) and a BlockPool.
    Before each forward, `bind` the block tables and cached lengths of the sequences in it (one per input row)."""

    def __init__(self, cfg, num_blocks: int, block_size: int, dtype, device):
        t = cfg.text
        shape = (num_blocks, block_size, t.num_kv_heads, t.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(t.num_layers)]
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size, self.device = block_size, device
        self.lengths, self.max_length, self.block_tables = [], 0, None

    @property
    def bytes_per_block(self) -> int:
        return 2 * len(self.keys) * self.keys[0][0].numel() * self.keys[0].element_size()

    def bind(self, block_tables: list[list[int]], cached_lengths: list[int]) -> None:
        """block_tables: per sequence, its blocks (enough for its cached and new tokens); cached_lengths: tokens
        each already holds."""
        width = max(len(t) for t in block_tables)
        self.block_tables = torch.tensor([t + [0] * (width - len(t)) for t in block_tables], dtype=torch.int32,
                                         device=self.device)
        self.lengths, self.max_length = list(cached_lengths), width * self.block_size

    def attend(self, layer: int, q, k, v, batch):
        """Store the new tokens' k/v in their blocks, then attend each new query to its sequence's cached and new
        keys: varlen attention for fresh prompts, the paged decode kernel for single tokens, and a gather for
        several tokens after a cached prefix."""
        keys, values = self.keys[layer], self.values[layer]
        blocks = self.block_tables[batch.cache_rows, batch.cache_slots // self.block_size].long()
        offsets = batch.cache_slots % self.block_size
        keys[blocks, offsets] = k.to(keys.dtype)
        values[blocks, offsets] = v.to(values.dtype)
        starts, lengths = batch.cache_starts, batch.lengths
        if all(s == 0 for s in starts):
            return ops.attention(q, k, v, causal=True, cu_seqlens=batch.cu_seqlens, max_seqlen=batch.max_seqlen)
        if all(n == 1 for n in lengths):
            return ops.paged_decode_attention(q, keys, values, self.block_tables, batch.cache_seqlens_after)
        return self._attend_mixed(q, k, v, keys, values, batch)

    def _attend_mixed(self, q, k, v, keys, values, batch):
        from gmaivl_rt.model import attend_after_prefix

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
                ks = keys[table].flatten(0, 1)[:total]
                vs = values[table].flatten(0, 1)[:total]
                out[bounds[r]:bounds[r + 1]] = attend_after_prefix(q[bounds[r]:bounds[r + 1]], ks, vs)
        return out

    def advance(self, lengths) -> None:
        self.lengths = [a + b for a, b in zip(self.lengths, lengths)]

"""The KV blocks' bookkeeping, which the scheduler (gmaivl_rt/engine/scheduler.py) owns: which blocks of the paged
KV cache (gmaivl_rt/engine/paged_cache.py) are free, in use or cached for reuse.

`BlockPool` counts references to blocks and keeps the full blocks of finished prompts in a prefix cache keyed by a
hash chain (`block_keys`): a block's key covers every token before it and the content hash of each image whose
tokens it holds, since all image tokens share one id. Unreferenced cached blocks stay until the space is needed
(least recently used first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

import torch


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

"""The KV blocks' bookkeeping, which the scheduler (gmaivl_rt/engine/scheduler.py) owns: which blocks of the paged
KV cache (gmaivl_rt/engine/paged_cache.py) are free, in use or cached for reuse.

`BlockPool` counts references to blocks and keeps the full blocks of finished prompts in a prefix cache keyed by a
hash chain (`block_keys`): a block's key covers every token before it and the content hash of each image whose
tokens it holds, since all image tokens share one id. Unreferenced cached blocks stay until the space is needed
(least recently used first).

Beside the full-block chain, every cached block (and a finished prompt's last, partly filled block) is indexed under
its parent's key with its contents (`block_contents`), so a prompt that departs from a cached one inside a block
still gets the shared tokens of that block (`longest_partial`; the scheduler copies them into a block of its own:
copy-on-write, as SGLang's radix cache shares any token prefix). A follow-up question about a cached image then
computes only its own question, not the rest of the block where the two prompts part (issue 29).
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
        self._cached: dict[bytes, int] = {}          # prefix key -> block (full blocks)
        self._key_of: dict[int, bytes] = {}          # block -> prefix key (full blocks)
        self._children: dict[bytes, dict[int, tuple]] = {}  # parent key -> {cached block: its contents}
        self._parent_of: dict[int, bytes] = {}       # every cached block, full or partly filled -> parent key
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
        """Blocks kept for reuse: full blocks of the prefix chain and partly filled last blocks."""
        return len(self._parent_of)

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
                self._forget(block)
            self.refcount[block] = 1
            blocks.append(block)
        self.peak_used = max(self.peak_used, self.num_used)
        return blocks

    def release(self, blocks) -> None:
        for block in blocks:
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                if block in self._parent_of:
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

    def register(self, key: bytes | None, block: int, parent: bytes = b"", contents: tuple = ()) -> None:
        """Offer a referenced block to the prefix cache (kept while referenced, then LRU): a full block under its
        chain `key`, or a finished prompt's partly filled last block with key None. Either is also found by
        `longest_partial` under `parent` (the previous block's key, b"" for a first block) with `contents` (its
        `block_contents`, as many as it holds)."""
        if block in self._parent_of or (key is not None and key in self._cached):
            return
        if key is not None:
            self._cached[key], self._key_of[block] = block, key
        self._parent_of[block] = parent
        self._children.setdefault(parent, {})[block] = tuple(contents)

    def longest_partial(self, parent: bytes, contents: tuple) -> tuple[int | None, int]:
        """(block, count): the cached block under `parent` whose contents share the longest start with `contents`
        (the next block of a prompt), and how many of its leading tokens they share; (None, 0) when none does.
        The block's keys/values for those tokens are the prompt's own: same tokens, same images, same positions
        after the same prefix. Only read: the caller copies them into a block of its own before anything is
        allocated (which could evict it)."""
        best, best_count = None, 0
        for block, cached in self._children.get(parent, {}).items():
            count = 0
            for a, b in zip(cached, contents):
                if a != b:
                    break
                count += 1
            if count > best_count:
                best, best_count = block, count
        if best is not None and self.refcount[best] == 0:
            self._evictable.move_to_end(best)  # used: the least recently used is evicted first
        return best, best_count

    def _forget(self, block: int) -> None:
        """Drop an evicted block from the prefix cache's indexes."""
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._cached[key]
        parent = self._parent_of.pop(block)
        children = self._children[parent]
        del children[block]
        if not children:
            del self._children[parent]


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


def block_contents(token_ids, start: int, end: int, image_spans=(), image_keys=()) -> tuple:
    """What decides the keys/values of positions [start, end) after a given prefix: per position its token id, or
    for an image's token (all share one id) the image's content key and the token's place in the image."""
    contents = list(token_ids[start:end])
    for (a, b), image_key in zip(image_spans, image_keys):
        for p in range(max(a, start), min(b, end)):
            contents[p - start] = (str(image_key), p - a)
    return tuple(contents)

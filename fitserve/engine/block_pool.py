"""The pool of KV-cache blocks: reference counts, an LRU free list and the prefix-cache index.

Every block is in exactly one of two states: owned (ref_count > 0, by one request or shared
read-only by several that have the same prefix) or free (ref_count == 0, in the free list).
A free block may still carry the hash of the tokens it holds; until the pool hands it out for
something else it can be revived by a prefix-cache hit. The free list is ordered by when the
blocks were freed, so the least recently used cached content is overwritten first.

The same class is both tiers of the prefix cache: the device's KV blocks and, with swap
preemption, the host's (`KVCacheManager.host_pool`). A device pool that `record_evictions`
remembers the cached blocks it overwrites, so their content can be copied to the host tier
first and stay findable there.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass


BlockHash = bytes


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_key: object = None) -> BlockHash:
    """Identity of a full block: a SHA-256 chained over the parent's hash, so equal hashes
    mean equal prefixes.

    A cryptographic hash matters here: with Python's `hash()` of a tuple of ints, a client
    could craft a block that collides with a popular system prompt's first block, and the
    blocks after it would then be indexed under the other prompt's chain (prefix-cache
    poisoning). SHA-256 of a 16-token block costs a few microseconds.
    """
    digest = hashlib.sha256(parent_hash or b"")
    digest.update(array("q", token_ids).tobytes())
    if extra_key is not None:
        digest.update(repr(extra_key).encode())
    return digest.digest()


@dataclass
class KVBlock:
    block_id: int
    ref_count: int = 0
    block_hash: BlockHash | None = None
    parent_hash: BlockHash | None = None
    token_ids: tuple[int, ...] = ()
    """Tokens the block holds, kept only while it is in the prefix-cache index (for hit checks)."""
    extra_key: object = None
    """What besides parent and tokens went into the hash (the first block's weights epoch)."""


@dataclass(frozen=True)
class EvictedBlock:
    """A cached block whose content `allocate` is about to overwrite (read it before the step)."""

    block_id: int
    block_hash: BlockHash
    parent_hash: BlockHash | None
    token_ids: tuple[int, ...]
    extra_key: object = None


class BlockPoolError(RuntimeError):
    """An ownership invariant was broken (double free, freeing a free block)."""


class BlockPool:
    """Fixed set of `num_blocks` blocks, allocated once; hands them out and takes them back."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True, record_evictions: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # Insertion order = eviction order (oldest first). Values are unused.
        self._free: OrderedDict[int, None] = OrderedDict((block_id, None) for block_id in range(num_blocks))
        self._cached: dict[BlockHash, int] = {}
        self.record_evictions = record_evictions
        self._evicted: list[EvictedBlock] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def allocate(self, count: int, contiguous: bool = False, after: int | None = None) -> list[int]:
        """Take `count` free blocks (evicting their cached content); the caller checked there are enough.

        `contiguous`: each block is the id after the previous one (the first: after `after`,
        the request's last block) whenever that block is free and caches nothing, ahead of the
        LRU order, so a request's blocks form runs of consecutive ids that a swap moves in one
        copy per run. Cached content is still evicted strictly least recently used first.
        """
        if count > len(self._free):
            raise BlockPoolError(f"asked for {count} blocks with only {len(self._free)} free")
        block_ids = []
        previous = after
        for _ in range(count):
            if (contiguous and previous is not None and previous + 1 in self._free
                    and self.blocks[previous + 1].block_hash is None):
                block_id = previous + 1
                del self._free[block_id]
            else:
                block_id, _ = self._free.popitem(last=False)
            previous = block_id
            block = self.blocks[block_id]
            if self.record_evictions and block.block_hash is not None and self._cached.get(block.block_hash) == block_id:
                self._evicted.append(EvictedBlock(block_id, block.block_hash, block.parent_hash, block.token_ids,
                                                 block.extra_key))
            self._forget_hash(block)
            block.ref_count = 1
            block_ids.append(block_id)
        return block_ids

    def lookup(self, parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_key: object = None) -> int | None:
        """Block id holding exactly these tokens after this parent, or None."""
        if not self.enable_prefix_caching:
            return None
        block_hash = hash_block_tokens(parent_hash, token_ids, extra_key)
        block_id = self._cached.get(block_hash)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        if block.token_ids != token_ids or block.parent_hash != parent_hash:
            return None  # a hash collision: treat as a miss
        return block_id

    def find(self, block_hash: BlockHash) -> int | None:
        """Block id indexed under this hash (computed by `hash_block_tokens`), or None."""
        return self._cached.get(block_hash) if self.enable_prefix_caching else None

    def take_evicted(self) -> list[EvictedBlock]:
        """Cached blocks handed out since the last call (with `record_evictions`), oldest first."""
        evicted, self._evicted = self._evicted, []
        return evicted

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on cached blocks found by `lookup` (reviving them if free)."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def register(self, block_id: int, parent_hash: BlockHash | None, token_ids: tuple[int, ...], extra_key: object = None) -> BlockHash:
        """Record that a block now holds these (complete) tokens, so later prompts can reuse it."""
        block = self.blocks[block_id]
        block_hash = hash_block_tokens(parent_hash, token_ids, extra_key)
        if not self.enable_prefix_caching or block.block_hash == block_hash:
            return block_hash
        self._forget_hash(block)
        # If an identical block is already indexed, keep the first: both stay valid owners' data.
        if block_hash not in self._cached:
            self._cached[block_hash] = block_id
            block.block_hash = block_hash
            block.parent_hash = parent_hash
            block.token_ids = token_ids
            block.extra_key = extra_key
        return block_hash

    def free(self, block_ids: list[int]) -> None:
        """Drop one reference per block; blocks reaching zero join the end of the free list.

        Callers pass a request's blocks tail-first, so its prefix blocks are freed last and
        therefore evicted last.
        """
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count <= 0:
                raise BlockPoolError(f"block {block_id} freed while already free")
            block.ref_count -= 1
            if block.ref_count == 0:
                if not self.enable_prefix_caching:
                    self._forget_hash(block)
                self._free[block_id] = None

    def reset_prefix_cache(self) -> None:
        """Forget all cached content of free blocks."""
        for block_id in self._free:
            self._forget_hash(self.blocks[block_id])

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None and self._cached.get(block.block_hash) == block.block_id:
            del self._cached[block.block_hash]
        block.block_hash = None
        block.parent_hash = None
        block.token_ids = ()
        block.extra_key = None

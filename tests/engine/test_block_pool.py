"""BlockPool: reference counts, the LRU free list and the prefix-cache index.

These are the guarantees the KV-cache manager builds on: a block is owned or free, never
both; shared prefix blocks are freed once per owner; cached content is overwritten in the
order it stopped being used; and a prefix-cache hit is only ever a block holding exactly the
requested tokens after exactly the requested parent.
"""

from __future__ import annotations

import pytest

from fitserve.engine import block_pool as block_pool_module
from fitserve.engine.block_pool import BlockPool, BlockPoolError, hash_block_tokens


def register_chain(pool: BlockPool, block_ids: list[int], chunks: list[tuple[int, ...]]) -> list[int]:
    """Register `chunks` as a chained prefix held in `block_ids`; returns the chain hashes."""
    hashes = []
    parent = None
    for block_id, chunk in zip(block_ids, chunks):
        parent = pool.register(block_id, parent, chunk)
        hashes.append(parent)
    return hashes


def test_allocate_takes_free_blocks_with_one_reference() -> None:
    """A fresh allocation is owned exclusively, so freeing it once must return it."""
    pool = BlockPool(num_blocks=4)
    block_ids = pool.allocate(3)
    assert len(set(block_ids)) == 3
    assert [pool.blocks[b].ref_count for b in block_ids] == [1, 1, 1]
    assert pool.num_free_blocks == 1
    pool.free(block_ids)
    assert pool.num_free_blocks == 4
    assert all(block.ref_count == 0 for block in pool.blocks)


def test_allocate_more_than_free_raises_and_changes_nothing() -> None:
    """Over-asking is a caller bug; it must not half-allocate and leak blocks."""
    pool = BlockPool(num_blocks=2)
    with pytest.raises(BlockPoolError):
        pool.allocate(3)
    assert pool.num_free_blocks == 2
    assert all(block.ref_count == 0 for block in pool.blocks)


def test_pool_needs_at_least_one_block() -> None:
    """An empty pool could never admit anything; it is refused up front."""
    with pytest.raises(ValueError):
        BlockPool(num_blocks=0)


def test_shared_prefix_block_has_two_references_and_is_freed_once_per_owner() -> None:
    """Two requests sharing a cached prefix block each hold one reference; the block only
    returns to the free pool when the second owner lets go."""
    pool = BlockPool(num_blocks=4)
    (block_id,) = pool.allocate(1)
    pool.register(block_id, None, (1, 2, 3, 4))
    hit = pool.lookup(None, (1, 2, 3, 4))
    assert hit == block_id
    pool.touch([hit])
    assert pool.blocks[block_id].ref_count == 2
    free_before = pool.num_free_blocks

    pool.free([block_id])
    assert pool.blocks[block_id].ref_count == 1
    assert pool.num_free_blocks == free_before  # still owned by the other request

    pool.free([block_id])
    assert pool.blocks[block_id].ref_count == 0
    assert pool.num_free_blocks == free_before + 1
    with pytest.raises(BlockPoolError):
        pool.free([block_id])


def test_double_free_raises() -> None:
    """Freeing a free block would put it in the free list twice and hand it to two owners."""
    pool = BlockPool(num_blocks=2)
    block_ids = pool.allocate(1)
    pool.free(block_ids)
    with pytest.raises(BlockPoolError):
        pool.free(block_ids)
    assert pool.num_free_blocks == 2


def test_freeing_a_never_allocated_block_raises() -> None:
    """A stray id in a block table must be caught, not silently counted negative."""
    pool = BlockPool(num_blocks=2)
    with pytest.raises(BlockPoolError):
        pool.free([0])
    assert pool.num_free_blocks == 2


def test_least_recently_freed_cached_block_is_evicted_first() -> None:
    """The free list is LRU: after filling the pool, the next allocation overwrites the
    block whose content has been unused the longest, and the most recent stays cached."""
    pool = BlockPool(num_blocks=3)
    first, second, third = pool.allocate(3)
    for token, block_id in enumerate([first, second, third]):
        pool.register(block_id, None, (token,))
    pool.free([second])
    pool.free([first])
    pool.free([third])

    (evicted,) = pool.allocate(1)
    assert evicted == second
    assert pool.lookup(None, (1,)) is None  # second's content is gone
    assert pool.lookup(None, (0,)) == first
    assert pool.lookup(None, (2,)) == third

    (evicted,) = pool.allocate(1)
    assert evicted == first
    assert pool.lookup(None, (2,)) == third


def test_tail_first_free_keeps_a_requests_first_block_longest() -> None:
    """A request's blocks freed tail-first (as KVCacheManager does) are evicted tail-first,
    so the shared-prefix-friendly first block survives the longest."""
    pool = BlockPool(num_blocks=3)
    block_ids = pool.allocate(3)
    chunks = [(10, 11), (12, 13), (14, 15)]
    register_chain(pool, block_ids, chunks)
    pool.free(list(reversed(block_ids)))

    evicted = [pool.allocate(1)[0] for _ in range(2)]
    assert evicted == [block_ids[2], block_ids[1]]
    assert pool.lookup(None, chunks[0]) == block_ids[0]


def test_revived_cached_block_leaves_the_free_list() -> None:
    """A free cached block revived by a hit is owned again: it must not be handed out by a
    later allocation (that would overwrite the KV a request is reading)."""
    pool = BlockPool(num_blocks=3)
    block_ids = pool.allocate(3)
    pool.register(block_ids[0], None, (7, 7))
    pool.free(block_ids)
    assert pool.num_free_blocks == 3

    hit = pool.lookup(None, (7, 7))
    assert hit == block_ids[0]
    pool.touch([hit])
    assert pool.blocks[hit].ref_count == 1
    assert pool.num_free_blocks == 2

    others = pool.allocate(2)
    assert hit not in others
    assert pool.lookup(None, (7, 7)) == hit  # still indexed while owned
    with pytest.raises(BlockPoolError):
        pool.allocate(1)


def test_revived_then_freed_block_goes_to_the_back_of_the_lru() -> None:
    """Reuse refreshes recency: a block that was revived and freed again is now the most
    recently used, so blocks that were not reused are evicted before it."""
    pool = BlockPool(num_blocks=2)
    a, b = pool.allocate(2)
    pool.register(a, None, (1,))
    pool.register(b, None, (2,))
    pool.free([a])
    pool.free([b])
    pool.touch([pool.lookup(None, (1,))])  # revive a
    pool.free([a])
    (evicted,) = pool.allocate(1)
    assert evicted == b
    assert pool.lookup(None, (1,)) == a


def test_allocation_forgets_the_evicted_content() -> None:
    """Once a cached block is handed out for new tokens its old hash must stop matching."""
    pool = BlockPool(num_blocks=1)
    (block_id,) = pool.allocate(1)
    pool.register(block_id, None, (5, 6))
    pool.free([block_id])
    assert pool.num_cached_blocks == 1
    assert pool.allocate(1) == [block_id]
    assert pool.lookup(None, (5, 6)) is None
    assert pool.num_cached_blocks == 0
    assert pool.blocks[block_id].block_hash is None


def test_lookup_needs_the_same_parent() -> None:
    """Hashes are chained: equal tokens after a different prefix are different KV."""
    pool = BlockPool(num_blocks=2)
    a, b = pool.allocate(2)
    parent_hash = pool.register(a, None, (1, 2))
    pool.register(b, parent_hash, (3, 4))
    assert pool.lookup(parent_hash, (3, 4)) == b
    assert pool.lookup(None, (3, 4)) is None
    assert pool.lookup(hash_block_tokens(None, (9, 9)), (3, 4)) is None


def test_hash_collision_with_different_tokens_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """If two different token blocks hash alike, a lookup must not return the other's KV."""
    monkeypatch.setattr(block_pool_module, "hash_block_tokens", lambda parent, tokens, extra=None: 42)
    pool = BlockPool(num_blocks=2)
    (block_id,) = pool.allocate(1)
    pool.register(block_id, None, (1, 2, 3))
    assert pool.lookup(None, (1, 2, 3)) == block_id
    assert pool.lookup(None, (4, 5, 6)) is None


def test_hash_collision_with_different_parent_is_a_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same tokens, colliding hash, different parent: still different KV, still a miss."""
    monkeypatch.setattr(block_pool_module, "hash_block_tokens", lambda parent, tokens, extra=None: 42)
    pool = BlockPool(num_blocks=2)
    (block_id,) = pool.allocate(1)
    pool.register(block_id, 7, (1, 2))
    assert pool.lookup(7, (1, 2)) == block_id
    assert pool.lookup(8, (1, 2)) is None
    assert pool.lookup(None, (1, 2)) is None


def test_colliding_block_is_not_indexed_over_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registering a second, different block under a colliding hash keeps the first one
    reachable and does not make the second one reachable under the first's tokens."""
    monkeypatch.setattr(block_pool_module, "hash_block_tokens", lambda parent, tokens, extra=None: 42)
    pool = BlockPool(num_blocks=2)
    a, b = pool.allocate(2)
    pool.register(a, None, (1,))
    pool.register(b, None, (2,))
    assert pool.lookup(None, (1,)) == a
    assert pool.lookup(None, (2,)) is None
    pool.free([a, b])
    assert pool.num_free_blocks == 2


def test_identical_content_registered_twice_keeps_both_blocks_valid() -> None:
    """Two requests that computed the same block before either was cached each own their
    copy; the index keeps one, and freeing both returns both."""
    pool = BlockPool(num_blocks=2)
    a, b = pool.allocate(2)
    hash_a = pool.register(a, None, (3, 3))
    hash_b = pool.register(b, None, (3, 3))
    assert hash_a == hash_b
    assert pool.lookup(None, (3, 3)) == a
    assert pool.num_cached_blocks == 1
    pool.free([b, a])
    assert pool.num_free_blocks == 2
    assert all(block.ref_count == 0 for block in pool.blocks)


def test_prefix_caching_disabled_never_hits() -> None:
    """With prefix caching off nothing is indexed, so no request can read another's KV."""
    pool = BlockPool(num_blocks=2, enable_prefix_caching=False)
    (block_id,) = pool.allocate(1)
    returned_hash = pool.register(block_id, None, (1, 2))
    assert returned_hash == hash_block_tokens(None, (1, 2))  # callers can still chain
    assert pool.lookup(None, (1, 2)) is None
    assert pool.num_cached_blocks == 0
    pool.free([block_id])
    assert pool.lookup(None, (1, 2)) is None
    assert pool.num_free_blocks == 2


def test_reset_prefix_cache_forgets_free_blocks_only() -> None:
    """Resetting must not unindex blocks someone still owns (their owners keep registering
    children under those hashes); free blocks lose their content."""
    pool = BlockPool(num_blocks=2)
    owned, freed = pool.allocate(2)
    pool.register(owned, None, (1,))
    pool.register(freed, None, (2,))
    pool.free([freed])
    pool.reset_prefix_cache()
    assert pool.lookup(None, (2,)) is None
    assert pool.lookup(None, (1,)) == owned
    assert pool.num_free_blocks == 1

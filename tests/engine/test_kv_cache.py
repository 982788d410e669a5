"""KVCacheManager: prefix-cache hits, block growth and release, seen from a request.

What users rely on: a repeated prompt prefix is not recomputed (and the metrics say how
much was reused), the last prompt token is always computed so there are logits to sample
from, a request that cannot get memory is left exactly as it was, and prompt log-probs are
never silently skipped by a cache hit.
"""

from __future__ import annotations

from fitserve.engine.kv_cache import KVCacheManager
from fitserve.engine.request import Request
from fitserve.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int], **sampling: object) -> Request:
    return Request(request_id=request_id, prompt_token_ids=list(prompt), sampling_params=SamplingParams(**sampling))


def prefill(manager: KVCacheManager, request: Request) -> None:
    """Attach the cached prefix, allocate and 'compute' the rest of the prompt in one step,
    then register the full blocks, as the scheduler does for an unchunked prefill (it owns
    the request's progress: the manager only attaches blocks)."""
    cached = manager.find_cached_prefix(request)
    num_cached = len(cached) * manager.block_size
    num_new = request.num_tokens - num_cached
    assert manager.allocate(request, num_new, cached)
    request.num_computed_tokens += num_cached + num_new
    manager.cache_full_blocks(request)


def ref_counts(manager: KVCacheManager) -> list[int]:
    """Every block's reference count, for before/after comparisons."""
    return [block.ref_count for block in manager.pool.blocks]


def test_blocks_needed_rounds_up() -> None:
    """A partly filled block still has to be allocated whole."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert [manager.blocks_needed(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_second_request_with_same_prefix_hits_the_full_blocks() -> None:
    """Two full blocks of shared prefix are reused read-only; only the divergent tail is new."""
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    shared = list(range(100, 108))
    first = make_request("a", shared + [1, 2, 3])
    prefill(manager, first)

    second = make_request("b", shared + [7, 8])
    cached = manager.find_cached_prefix(second)
    assert cached == first.block_ids[:2]
    assert manager.allocate(second, second.num_tokens - 8, cached)
    assert second.block_ids[:2] == first.block_ids[:2]
    assert second.block_ids[2] not in first.block_ids
    assert second.num_computed_tokens == 0, "progress is the scheduler's to move"
    assert second.metrics.num_cached_prompt_tokens == 8
    assert first.metrics.num_cached_prompt_tokens == 0
    for block_id in first.block_ids[:2]:
        assert manager.pool.blocks[block_id].ref_count == 2


def test_block_aligned_prompt_never_hits_its_last_token() -> None:
    """Even when the whole prompt is cached, its last token is recomputed: that step is
    what produces the logits for the first output token."""
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(12))  # exactly three blocks
    first = make_request("a", prompt)
    prefill(manager, first)
    assert manager.pool.num_cached_blocks == 3

    second = make_request("b", prompt)
    cached = manager.find_cached_prefix(second)
    assert cached == first.block_ids[:2]
    assert manager.allocate(second, second.num_tokens - 8, cached)
    assert len(second.block_ids) == 3  # two cached blocks + one for the recomputed last block
    assert second.metrics.num_cached_prompt_tokens == 8


def test_one_block_prompt_gets_no_hit() -> None:
    """A prompt of exactly one block has nothing reusable: its only block holds the last token."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    prefill(manager, make_request("a", [1, 2, 3, 4]))
    assert manager.find_cached_prefix(make_request("b", [1, 2, 3, 4])) == []


def test_prefix_hit_stops_at_the_first_different_block() -> None:
    """A differing block breaks the chain; later equal blocks are a different prefix."""
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    first = make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0])
    prefill(manager, first)
    second = make_request("b", [1, 1, 1, 1, 9, 9, 9, 9, 3, 3, 3, 3, 0])
    assert manager.find_cached_prefix(second) == first.block_ids[:1]


def test_find_cached_prefix_takes_no_reference() -> None:
    """Looking is free: the scheduler may look and then decide not to admit."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(9)))
    prefill(manager, first)
    before = ref_counts(manager)
    free_before = manager.num_free_blocks
    assert manager.find_cached_prefix(make_request("b", list(range(9))))
    assert ref_counts(manager) == before
    assert manager.num_free_blocks == free_before


def test_hit_on_freed_blocks_revives_them() -> None:
    """A finished request's prefix stays cached in the free pool and can be revived."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    first = make_request("a", prompt)
    prefill(manager, first)
    prefix_blocks = first.block_ids[:2]
    manager.free(first)
    assert manager.num_free_blocks == 4

    second = make_request("b", prompt)
    prefill(manager, second)
    assert second.block_ids[:2] == prefix_blocks
    assert second.metrics.num_cached_prompt_tokens == 8
    assert manager.num_free_blocks == 4 - 3


def test_allocate_fails_without_side_effects() -> None:
    """When the pool is short the request keeps its blocks, progress and metrics unchanged,
    and no cached block is revived — the scheduler just tries again later."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    first = make_request("a", prompt)
    prefill(manager, first)  # 3 blocks, 2 of them cached full prefix
    manager.free(first)
    hog = make_request("hog", [500, 501])
    assert manager.allocate(hog, 2)  # takes the never-used block, leaving 3 free
    state = (ref_counts(manager), manager.num_free_blocks, manager.pool.num_cached_blocks)

    second = make_request("b", prompt + list(range(50, 58)))  # needs 2 cached + 3 new blocks
    cached = manager.find_cached_prefix(second)
    assert len(cached) == 2
    assert not manager.allocate(second, second.num_tokens - 8, cached)
    assert (ref_counts(manager), manager.num_free_blocks, manager.pool.num_cached_blocks) == state
    assert second.block_ids == []
    assert second.num_computed_tokens == 0
    assert second.metrics.num_cached_prompt_tokens == 0
    assert manager.find_cached_prefix(second) == cached  # the prefix is still there


def test_allocate_counts_revived_blocks_against_the_free_pool() -> None:
    """Reviving a free cached block uses up a free block; the check must count it, or the
    pool would be asked for more blocks than it has."""
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    first = make_request("a", list(range(5)))
    prefill(manager, first)  # 2 blocks, the first one cached
    manager.free(first)
    # 3 free blocks: 1 to revive + 3 new would be 4.
    second = make_request("b", list(range(4)) + list(range(100, 110)))
    cached = manager.find_cached_prefix(second)
    assert len(cached) == 1
    assert not manager.allocate(second, second.num_tokens - 4, cached)
    assert manager.num_free_blocks == 3
    # 1 revived + 2 new fits exactly.
    assert manager.allocate(second, 8, cached)
    assert manager.num_free_blocks == 0


def test_growth_allocates_a_block_only_when_one_fills() -> None:
    """Decoding one token at a time takes a new block every block_size tokens."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3])
    assert manager.allocate(request, 3)
    assert len(request.block_ids) == 1
    request.num_computed_tokens = 3
    sizes = []
    for token in range(6):
        request.output_token_ids.append(token)
        assert manager.allocate(request, 1)
        request.num_computed_tokens += 1
        manager.cache_full_blocks(request)
        sizes.append(len(request.block_ids))
    assert sizes == [1, 2, 2, 2, 2, 3]
    assert manager.pool.num_cached_blocks == 2


def test_prompt_logprobs_request_gets_no_prefix_hit() -> None:
    """Prompt log-probs need logits at every prompt position, so nothing may be skipped."""
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE)
    prompt = list(range(13))
    prefill(manager, make_request("a", prompt))
    wants_logprobs = make_request("b", prompt, prompt_logprobs=0)
    assert manager.find_cached_prefix(wants_logprobs) == []
    prefill(manager, wants_logprobs)
    assert wants_logprobs.metrics.num_cached_prompt_tokens == 0
    assert manager.find_cached_prefix(make_request("c", prompt))  # others still hit


def test_prefix_caching_disabled_gives_no_hits() -> None:
    """Turned off, identical prompts each compute and own their own blocks."""
    manager = KVCacheManager(num_blocks=16, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    prompt = list(range(13))
    prefill(manager, make_request("a", prompt))
    second = make_request("b", prompt)
    assert manager.find_cached_prefix(second) == []
    prefill(manager, second)
    assert second.metrics.num_cached_prompt_tokens == 0
    assert max(ref_counts(manager)) == 1


def test_cache_full_blocks_registers_only_computed_full_blocks() -> None:
    """A block is shareable only once all its tokens have KV; a half-computed chunk must not
    be offered to other requests."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(10))
    first = make_request("a", prompt)
    assert manager.allocate(first, 6)  # a 6-token chunk: one full block, one half block
    first.num_computed_tokens = 6
    manager.cache_full_blocks(first)
    assert manager.pool.num_cached_blocks == 1
    assert manager.find_cached_prefix(make_request("b", prompt)) == first.block_ids[:1]

    assert manager.allocate(first, 4)
    first.num_computed_tokens = 10
    manager.cache_full_blocks(first)
    assert manager.pool.num_cached_blocks == 2
    assert manager.find_cached_prefix(make_request("c", prompt)) == first.block_ids[:2]


def test_generated_tokens_are_cached_too() -> None:
    """Output tokens fill blocks like prompt tokens; a follow-up prompt that repeats the
    conversation so far (multi-turn chat) reuses them."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    first = make_request("a", [1, 2, 3])
    prefill(manager, first)
    for token in (4, 5, 6):
        first.output_token_ids.append(token)
        assert manager.allocate(first, 1)
        first.num_computed_tokens += 1
        manager.cache_full_blocks(first)
    follow_up = make_request("b", [1, 2, 3, 4, 5, 6, 7])
    assert manager.find_cached_prefix(follow_up) == first.block_ids[:1]


def test_free_releases_tail_first_and_clears_the_request() -> None:
    """Freed tail-first, the request's last block is the first to be overwritten and its
    prefix the last; the request holds nothing afterwards."""
    manager = KVCacheManager(num_blocks=3, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(12)))
    prefill(manager, request)
    block_ids = list(request.block_ids)
    manager.free(request)
    assert request.block_ids == []
    assert manager.num_free_blocks == 3
    assert ref_counts(manager) == [0, 0, 0]
    evicted = manager.pool.allocate(3)
    assert evicted == list(reversed(block_ids))


def test_shared_blocks_survive_one_owner_leaving() -> None:
    """Freeing one of two sharers must leave the other's prefix blocks owned and intact."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = list(range(9))
    first = make_request("a", prompt)
    second = make_request("b", prompt)
    prefill(manager, first)
    prefill(manager, second)
    manager.free(first)
    for block_id in second.block_ids:
        assert manager.pool.blocks[block_id].ref_count == 1
    manager.free(second)
    assert manager.num_free_blocks == manager.num_blocks
    assert max(ref_counts(manager)) == 0


def test_usage_is_the_owned_fraction() -> None:
    """Usage feeds metrics and load balancing: free cached blocks count as free."""
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    assert manager.usage() == 0.0
    request = make_request("a", list(range(8)))
    assert manager.allocate(request, 8)
    assert manager.usage() == 0.5
    assert manager.can_allocate(2)
    assert not manager.can_allocate(3)

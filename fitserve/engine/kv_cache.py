"""Per-request KV-cache accounting on top of the block pool: prefix hits, growth, release.

This is the one place that knows how many blocks a request holds and which of them are
shared through the prefix cache, on the device and, with swap preemption, in host memory.
The scheduler asks it questions in tokens; it answers in blocks (and, for swaps, in the
groups of consecutive blocks that one copy each moves; the engine does the copying).

With a host tier that caches prefixes (`host_prefix_cache`), the prefix cache spans both
tiers. Host blocks are hashed exactly as device blocks are (the same chained SHA-256, the
same `BlockPool`), and held either by a swapped-out request's host copy or, unowned, in the
host pool's own LRU. They get there two ways: a swap-out registers the full blocks it copies,
and a cached device block that the device pool overwrites is first copied to the host
(unless the host already holds that hash), so evicting it from the device does not lose it.
A new request whose prefix continues in the host tier after its device hits has those blocks
copied in (`load_prefix`) instead of recomputed, and joins once the copy is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitserve.engine.block_pool import BlockHash, BlockPool
from fitserve.engine.request import Request

CopyGroup = tuple[int, int, int]
"""(first source block, first destination block, number of consecutive blocks): one copy."""


@dataclass
class HostCopy:
    """A request's KV in host memory: block i holds tokens [i*block_size, (i+1)*block_size)."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    """Tokens whose K/V the host blocks hold (valid until the request finishes)."""


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 num_host_blocks: int = 0, host_prefix_cache: bool = True) -> None:
        self.block_size = block_size
        self.host_prefix_cache = bool(num_host_blocks) and enable_prefix_caching and host_prefix_cache
        """Whether the host tier caches prefixes too (it needs host blocks and device hashing)."""
        self.pool = BlockPool(num_blocks, enable_prefix_caching, record_evictions=self.host_prefix_cache)
        # Hashes of each request's leading full blocks that are already registered, in order.
        self._block_hashes: dict[str, list[BlockHash]] = {}
        self.host_pool = BlockPool(num_host_blocks, self.host_prefix_cache) if num_host_blocks else None
        """Host blocks for swapped-out KV (swap preemption) and, with `host_prefix_cache`,
        cached prefix blocks; None without swap space."""
        self._host: dict[str, HostCopy] = {}
        # Host blocks a request's prefix load reads from, referenced until its copy is done.
        self._loading: dict[str, list[int]] = {}
        # Device -> host copies of evicted cached blocks, and the host blocks they fill, which
        # stay referenced until `take_offloads` hands the copies over (nothing may reuse them
        # before the copy is made).
        self._offloads: list[tuple[int, int]] = []
        self.num_host_hit_tokens_total = 0
        """Prompt tokens copied in from the host tier instead of computed."""
        self.num_offloaded_blocks_total = 0
        """Cached device blocks copied to the host tier as the device overwrote them."""
        # Swap wants each request's blocks in runs of consecutive ids (one copy per run).
        self._contiguous = self.host_pool is not None
        self.weights_epoch = 0
        """Bumped when the model's weights change (an elastic-weights resize). It salts the
        first block's hash of every prefix chain, so KV computed with other weights is never
        a prefix-cache hit; each request keeps the epoch it started computing in."""

    def new_weights_epoch(self) -> None:
        """The model's weights changed: no later request may reuse KV cached before now."""
        self.weights_epoch += 1
        self.pool.reset_prefix_cache()
        if self.host_prefix_cache:
            assert self.host_pool is not None
            self.host_pool.reset_prefix_cache()

    @staticmethod
    def _epoch_key(epoch: int) -> object:
        return None if epoch == 0 else ("weights", epoch)  # epoch 0 hashes as before

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def find_cached_prefix(self, request: Request) -> list[int]:
        """Blocks of the longest cached prefix of the request's tokens, without taking them.

        At least the last known token is always left to compute, because the step that
        computes it produces the logits for the next token.
        """
        if not self.pool.enable_prefix_caching or request.sampling_params.prompt_logprobs is not None:
            return []  # prompt log-probs need every prompt position computed
        return _find_chain(self.pool, request, self.block_size, 0, None, self._epoch_key(self.weights_epoch))

    def find_host_prefix(self, request: Request, device_block_ids: list[int]) -> list[int]:
        """Host blocks continuing the device hits `device_block_ids` (from `find_cached_prefix`)
        along the same hash chain, without taking them; [] without a host prefix cache."""
        if not self.host_prefix_cache or request.sampling_params.prompt_logprobs is not None:
            return []
        assert self.host_pool is not None
        parent_hash = self.pool.blocks[device_block_ids[-1]].block_hash if device_block_ids else None
        return _find_chain(self.host_pool, request, self.block_size, len(device_block_ids), parent_hash,
                           self._epoch_key(self.weights_epoch))

    def allocate(self, request: Request, num_new_tokens: int, cached_block_ids: list[int] | None = None) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens (after any cached prefix).

        Returns False, changing nothing, when the pool cannot supply them. On success a
        cached prefix is attached to the request's block table; moving `num_computed_tokens`
        past it is the scheduler's job (a request's progress has one owner).
        """
        if request.num_computed_tokens == 0 and not request.block_ids:
            request.kv_weights_epoch = self.weights_epoch  # (re)starts computing its KV now
        room = len(request.block_ids) * self.block_size - request.num_computed_tokens
        if not cached_block_ids and num_new_tokens <= room:
            return True  # the common decode step: its token fits in the last block
        cached_block_ids = cached_block_ids or []
        num_cached_tokens = len(cached_block_ids) * self.block_size
        needed_total = self.blocks_needed(request.num_computed_tokens + num_cached_tokens + num_new_tokens)
        num_new_blocks = max(0, needed_total - len(request.block_ids) - len(cached_block_ids))
        # Cached blocks that are currently free count against the free pool when revived.
        num_revived = sum(1 for b in cached_block_ids if self.pool.blocks[b].ref_count == 0)
        if num_new_blocks + num_revived > self.pool.num_free_blocks:
            return False
        if cached_block_ids:
            self.pool.touch(cached_block_ids)
            request.block_ids.extend(cached_block_ids)
            if request.metrics.num_preemptions == 0:
                # On resumption the hits are mostly the request's own earlier blocks (and may
                # include output tokens): counting them again would exceed the prompt.
                request.metrics.num_cached_prompt_tokens = num_cached_tokens
            self._block_hashes[request.request_id] = [
                self.pool.blocks[b].block_hash for b in cached_block_ids  # type: ignore[misc]
            ]
        if num_new_blocks:
            last = request.block_ids[-1] if request.block_ids else None
            request.block_ids.extend(self._allocate_device(num_new_blocks, self._contiguous, last))
        return True

    def _allocate_device(self, count: int, contiguous: bool, after: int | None = None) -> list[int]:
        """`BlockPool.allocate` on the device, first saving the cached blocks it overwrites to
        the host tier (the copies are made before the step: `take_offloads`)."""
        block_ids = self.pool.allocate(count, contiguous, after)
        if self.host_prefix_cache:
            self._offload_evicted()
        return block_ids

    def _offload_evicted(self) -> None:
        host_pool = self.host_pool
        assert host_pool is not None
        evicted = [block for block in self.pool.take_evicted() if host_pool.find(block.block_hash) is None]
        # Blocks owned by swapped-out requests are not free: cached content may go, they may not.
        # In id order, so that consecutive device blocks land in consecutive host blocks (one copy).
        evicted = sorted(evicted[:host_pool.num_free_blocks], key=lambda block: block.block_id)
        if not evicted:
            return
        host_ids = host_pool.allocate(len(evicted), contiguous=True)
        for block, host_id in zip(evicted, host_ids):
            host_pool.register(host_id, block.parent_hash, block.token_ids, block.extra_key)
            self._offloads.append((block.block_id, host_id))
        self.num_offloaded_blocks_total += len(evicted)

    def take_offloads(self) -> list[CopyGroup]:
        """Device -> host copies that save evicted cached blocks; the caller makes them before
        the step writes into those device blocks (and before any copy into them starts). The
        host blocks join the host LRU, findable by their hashes."""
        pairs, self._offloads = self._offloads, []
        if not pairs:
            return []
        assert self.host_pool is not None
        self.host_pool.free([host_id for _, host_id in reversed(pairs)])  # the later blocks go first
        return _groups([device_id for device_id, _ in pairs], [host_id for _, host_id in pairs])

    def can_allocate(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free_blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Register every block whose tokens are all computed, so later requests can share it."""
        if not self.pool.enable_prefix_caching:
            return
        hashes = self._block_hashes.setdefault(request.request_id, [])
        num_full = min(request.num_computed_tokens, request.num_tokens) // self.block_size
        if num_full <= len(hashes):
            return
        tokens = request.all_token_ids
        parent_hash = hashes[-1] if hashes else None
        for index in range(len(hashes), num_full):
            chunk = tuple(tokens[index * self.block_size : (index + 1) * self.block_size])
            extra_key = self._epoch_key(request.kv_weights_epoch) if index == 0 else None
            parent_hash = self.pool.register(request.block_ids[index], parent_hash, chunk, extra_key)
            hashes.append(parent_hash)

    def free(self, request: Request) -> None:
        """Release all of the request's blocks, tail first (its prefix stays cached longest)."""
        self.pool.free(list(reversed(request.block_ids)))
        request.block_ids = []
        self._block_hashes.pop(request.request_id, None)

    # ------------------------------------------------------------------ the host tier (swap)

    def swap_out(self, request: Request) -> list[CopyGroup] | None:
        """Make the host copy cover the request's computed tokens and release its device blocks.

        Only blocks the host copy lacks are copied: a request swapped out before keeps its host
        copy, so a second swap-out with no new tokens copies nothing, and a full block whose
        hash the host tier already holds (another request's prefix, or an evicted cached
        block) is shared, not copied. Copied full blocks are registered in the host tier's
        prefix cache. Returns the device -> host copies to make before the device blocks are
        written again, or None (changing nothing) when host memory cannot hold the request.
        """
        host_pool = self.host_pool
        if host_pool is None:
            return None
        host = self._host.get(request.request_id) or HostCopy()
        num_blocks = self.blocks_needed(request.num_computed_tokens)
        hashes = self._block_hashes.get(request.request_id, [])
        known = len(host.block_ids)
        shared = [host_pool.find(hashes[index]) if index < len(hashes) else None
                  for index in range(known, num_blocks)]
        missing = shared.count(None)
        num_revived = sum(1 for block_id in shared if block_id is not None and host_pool.blocks[block_id].ref_count == 0)
        if missing + num_revived > host_pool.num_free_blocks:
            return None
        host_pool.touch([block_id for block_id in shared if block_id is not None])
        last = host.block_ids[-1] if host.block_ids else None
        fresh = iter(host_pool.allocate(missing, contiguous=True, after=last) if missing else [])
        host.block_ids.extend(block_id if block_id is not None else next(fresh) for block_id in shared)
        self._host[request.request_id] = host
        # The block holding the host copy's last token may have gained tokens since.
        copied = list(range(host.num_tokens // self.block_size, known))
        copied += [known + offset for offset, block_id in enumerate(shared) if block_id is None]
        groups = _groups([request.block_ids[index] for index in copied], [host.block_ids[index] for index in copied])
        tokens = request.all_token_ids
        for index in copied:
            if index < len(hashes):  # a full block the device cache registered
                parent_hash = hashes[index - 1] if index else None
                extra_key = self._epoch_key(request.kv_weights_epoch) if index == 0 else None
                host_pool.register(host.block_ids[index], parent_hash,
                                   tuple(tokens[index * self.block_size:(index + 1) * self.block_size]), extra_key)
        host.num_tokens = request.num_computed_tokens
        self.free(request)
        return groups

    def swap_in(self, request: Request, headroom_blocks: int = 0) -> list[CopyGroup] | None:
        """Device blocks for a swapped-out request's computed tokens, and the host -> device
        copies that fill them; None (changing nothing) when the device has too few free
        blocks, or would be left with fewer than `headroom_blocks` free. Leading full blocks the device still caches (the request's own, freed at
        swap-out and not yet overwritten, or another request's with the same prefix) are
        shared, not copied. The host copy is kept for the next swap-out."""
        host = self._host[request.request_id]
        num_blocks = self.blocks_needed(host.num_tokens)
        cached = _find_chain(self.pool, request, self.block_size, 0, None,
                             self._epoch_key(request.kv_weights_epoch))[:host.num_tokens // self.block_size]
        num_revived = sum(1 for block_id in cached if self.pool.blocks[block_id].ref_count == 0)
        if num_blocks - len(cached) + num_revived + headroom_blocks > self.pool.num_free_blocks:
            return None
        self.pool.touch(cached)
        self._block_hashes[request.request_id] = [self.pool.blocks[b].block_hash for b in cached]  # type: ignore[misc]
        fresh = self._allocate_device(num_blocks - len(cached), True, cached[-1] if cached else None)
        request.block_ids = cached + fresh
        return _groups(host.block_ids[len(cached):num_blocks], fresh)

    def load_prefix(self, request: Request, device_block_ids: list[int], host_block_ids: list[int]) -> list[CopyGroup] | None:
        """Attach a new request's cached prefix that continues in the host tier: the device
        hits are shared, the host hits get fresh device blocks and are copied in (host ->
        device groups returned), the host blocks referenced until `finish_load`. None,
        changing nothing, when the device has too few free blocks. The loaded blocks are
        registered in the device index only once their copy is done (`finish_load`): another
        request must not attach them while they are being written."""
        num_revived = sum(1 for block_id in device_block_ids if self.pool.blocks[block_id].ref_count == 0)
        if len(host_block_ids) + num_revived > self.pool.num_free_blocks:
            return None
        assert self.host_pool is not None
        self.pool.touch(device_block_ids)
        self.host_pool.touch(host_block_ids)
        self._loading[request.request_id] = list(host_block_ids)
        request.kv_weights_epoch = self.weights_epoch  # the hits were found under this epoch
        last = device_block_ids[-1] if device_block_ids else None
        loaded = self._allocate_device(len(host_block_ids), True, last)
        request.block_ids = list(device_block_ids) + loaded
        self._block_hashes[request.request_id] = [
            self.pool.blocks[b].block_hash for b in device_block_ids  # type: ignore[misc]
        ]
        if request.metrics.num_preemptions == 0:
            request.metrics.num_cached_prompt_tokens = len(request.block_ids) * self.block_size
            self.num_host_hit_tokens_total += len(host_block_ids) * self.block_size
        return _groups(host_block_ids, loaded)

    def finish_load(self, request: Request) -> None:
        """The request's blocks were copied in: release the host blocks it read from (they stay
        cached in the host tier) and index the loaded device blocks."""
        if self.host_pool is not None:
            self.host_pool.free(self._loading.pop(request.request_id, []))
        self.cache_full_blocks(request)

    def free_host(self, request: Request) -> None:
        """Release the request's host copy (it finished, or resumes by recomputation)."""
        host = self._host.pop(request.request_id, None)
        if self.host_pool is None:
            return
        if host is not None:
            self.host_pool.free(list(reversed(host.block_ids)))  # tail first, as on the device
        self.host_pool.free(self._loading.pop(request.request_id, []))

    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks


def _find_chain(pool: BlockPool, request: Request, block_size: int, start: int,
                parent_hash: BlockHash | None, first_block_key: object = None) -> list[int]:
    """Blocks of `pool` holding the request's blocks `start`, `start`+1, ... after `parent_hash`,
    up to the first miss; never the block with the last known token. `first_block_key` salts
    block 0's hash (the weights epoch)."""
    max_blocks = (request.num_tokens - 1) // block_size
    block_ids: list[int] = []
    tokens = request.all_token_ids
    for index in range(start, max_blocks):
        chunk = tuple(tokens[index * block_size : (index + 1) * block_size])
        block_id = pool.lookup(parent_hash, chunk, first_block_key if index == 0 else None)
        if block_id is None:
            break
        block_ids.append(block_id)
        parent_hash = pool.blocks[block_id].block_hash
    return block_ids


def _groups(sources: list[int], destinations: list[int]) -> list[CopyGroup]:
    """Pair up blocks into runs where both sides are consecutive: one copy per run."""
    groups: list[CopyGroup] = []
    for source, destination in zip(sources, destinations):
        if groups:
            first_source, first_destination, count = groups[-1]
            if source == first_source + count and destination == first_destination + count:
                groups[-1] = (first_source, first_destination, count + 1)
                continue
        groups.append((source, destination, 1))
    return groups

"""Per-request KV-cache accounting on top of the block pool: prefix hits, growth, release.

This is the one place that knows how many blocks a request holds and which of them are
shared through the prefix cache, on the device and, with swap preemption, in host memory.
The scheduler asks it questions in tokens; it answers in blocks (and, for swaps, in the
groups of consecutive blocks that one copy each moves; the engine does the copying).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fitserve.engine.block_pool import BlockHash, BlockPool
from fitserve.engine.host_block_pool import HostBlockPool
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
                 num_host_blocks: int = 0) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        # Hashes of each request's leading full blocks that are already registered, in order.
        self._block_hashes: dict[str, list[BlockHash]] = {}
        self.host_pool = HostBlockPool(num_host_blocks) if num_host_blocks else None
        """Host blocks for swapped-out KV (swap preemption); None without swap space."""
        self._host: dict[str, HostCopy] = {}
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
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        parent_hash: BlockHash | None = None
        tokens = request.all_token_ids
        for index in range(max_blocks):
            chunk = tuple(tokens[index * self.block_size : (index + 1) * self.block_size])
            extra_key = self._epoch_key(self.weights_epoch) if index == 0 else None
            block_id = self.pool.lookup(parent_hash, chunk, extra_key)
            if block_id is None:
                break
            block_ids.append(block_id)
            parent_hash = self.pool.blocks[block_id].block_hash
        return block_ids

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
            request.block_ids.extend(self.pool.allocate(num_new_blocks, self._contiguous, last))
        return True

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
        copy, so a second swap-out with no new tokens copies nothing. Returns the device ->
        host copies to make before the device blocks are written again, or None (changing
        nothing) when host memory cannot hold the request.
        """
        if self.host_pool is None:
            return None
        host = self._host.get(request.request_id) or HostCopy()
        num_blocks = self.blocks_needed(request.num_computed_tokens)
        missing = num_blocks - len(host.block_ids)
        if missing > self.host_pool.num_free_blocks:
            return None
        if missing > 0:
            last = host.block_ids[-1] if host.block_ids else None
            host.block_ids.extend(self.host_pool.allocate(missing, prefer_after=last))
        self._host[request.request_id] = host
        # The block holding the host copy's last token may have gained tokens since.
        first = host.num_tokens // self.block_size
        groups = _groups(request.block_ids[first:num_blocks], host.block_ids[first:num_blocks])
        host.num_tokens = request.num_computed_tokens
        self.free(request)
        return groups

    def swap_in(self, request: Request) -> list[CopyGroup] | None:
        """Device blocks for a swapped-out request's computed tokens, and the host -> device
        copies that fill them; None (changing nothing) when the device has too few free
        blocks. The host copy is kept for the next swap-out."""
        host = self._host[request.request_id]
        num_blocks = self.blocks_needed(host.num_tokens)
        if num_blocks > self.pool.num_free_blocks:
            return None
        request.block_ids = self.pool.allocate(num_blocks, contiguous=True)
        return _groups(host.block_ids[:num_blocks], request.block_ids)

    def can_swap_in(self, request: Request) -> bool:
        host = self._host.get(request.request_id)
        return host is not None and self.blocks_needed(host.num_tokens) <= self.pool.num_free_blocks

    def free_host(self, request: Request) -> None:
        """Release the request's host copy (it finished, or resumes by recomputation)."""
        host = self._host.pop(request.request_id, None)
        if host is not None and self.host_pool is not None:
            self.host_pool.free(host.block_ids)

    def usage(self) -> float:
        return 1.0 - self.pool.num_free_blocks / self.pool.num_blocks


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

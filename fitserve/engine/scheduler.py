"""Continuous batching with a per-step token budget and stall-free chunked prefill.

Each step (Sarathi-Serve's order):
  1. running requests that decode get one token each — nothing may stall them;
  2. running requests part-way through their prompt get `min(remaining, budget left)`;
  3. waiting requests are admitted, in the policy's order, while the budget, `max_num_seqs`
     and free KV blocks allow (their cached prefix is attached first and skipped).
When a running request cannot get a block, the policy names a victim that is preempted: its
blocks are freed and it is recomputed later (its prefix will often still be cached), or,
with `preemption_mode="swap"`, its KV is copied to host memory and copied back when it is
admitted again, progress intact (FastSwitch). A swapped-in request runs only once the engine
reports its copy done (`finish_swap_in`). A new request whose cached prefix continues in the
host tier (`KVCacheManager.find_host_prefix`) is admitted the same way: those blocks are
copied in rather than computed, and it runs once the copy is done. The scheduler never
touches tensors: it names the copies (`SchedulerOutput.offload` / `swap_out` / `swap_in`)
and the engine makes them.

A request's progress, `num_computed_tokens`, has one owner: this scheduler. It moves the
number when it attaches a cached prefix, when it preempts, and in `update_from_output`, which
the engine calls once per executed step (vLLM's `update_from_output`, nano-vllm's
`postprocess`). The KV-cache manager and the engine only read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fitserve.engine.kv_cache import CopyGroup, KVCacheManager
from fitserve.engine.policy import FCFSPolicy, SchedulingPolicy
from fitserve.engine.request import Request, RequestStatus


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int

    @property
    def completes_sequence(self) -> bool:
        """After this step every known token is computed, so the step yields the next token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    offload: list[CopyGroup] = field(default_factory=list)
    """Device -> host copies saving cached blocks this step overwrites to the host tier; made
    first, before the step and before any other copy touches those blocks."""
    swap_out: list[tuple[Request, list[CopyGroup]]] = field(default_factory=list)
    """Device -> host copies to make before this step writes into any block."""
    swap_in: list[tuple[Request, list[CopyGroup]]] = field(default_factory=list)
    """Host -> device copies to start; each request joins once its copies are done."""

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_batched_tokens: int,
        max_num_seqs: int,
        enable_chunked_prefill: bool = True,
        policy: SchedulingPolicy | None = None,
        preemption_mode: str = "recompute",
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        # Not `policy or ...`: a policy with an empty queue has len 0 and would be falsy.
        self.policy: SchedulingPolicy = policy if policy is not None else FCFSPolicy()
        self.preemption_mode = preemption_mode
        self.running: list[Request] = []
        self.swapping_in: list[Request] = []
        """Admitted requests whose KV is being copied back; they hold device blocks."""
        self.num_preemptions_total = 0
        self.num_swap_outs_total = 0
        self.num_swap_ins_total = 0
        self.num_computed_tokens_total = 0
        """Tokens the executed steps computed K/V for: prompts, recomputation and decode."""
        self.num_recomputed_tokens_total = 0
        """Of those, tokens computed a second time after a preemption (what swap saves)."""

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or bool(self.swapping_in) or len(self.policy) > 0

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.policy.add(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens

        decodes: list[Request] = []
        prefills: list[Request] = []
        for request in self.running:
            num_uncomputed = request.num_uncomputed_tokens
            if num_uncomputed == 1:
                decodes.append(request)
            elif num_uncomputed > 1:
                prefills.append(request)
        for request in decodes + prefills:
            if budget == 0:
                break
            if request.status != RequestStatus.RUNNING:
                continue  # preempted earlier in this loop
            num_new = min(request.num_uncomputed_tokens, budget)
            if num_new < request.num_uncomputed_tokens and not self._may_chunk(request.num_uncomputed_tokens):
                continue
            num_preempted = len(output.preempted)
            if self._allocate_or_preempt(request, num_new, output):
                output.scheduled.append(ScheduledRequest(request, num_new))
                budget -= num_new
            if len(output.preempted) > num_preempted:
                budget += self._unschedule_preempted(output)

        # Admitting new work right after preempting would only thrash the cache.
        if not output.preempted:
            budget = self._admit_waiting(budget, output)
        output.offload = self.kv_cache.take_offloads()
        return output

    def _may_chunk(self, num_uncomputed: int) -> bool:
        """Whether these tokens may be split over steps. With chunked prefill off a prompt is
        scheduled whole (the engine rejects prompts over the budget), but a request resumed
        after preemption recomputes prompt + output, which can exceed the budget: it could
        never run whole and would block the queue forever, so it is split anyway."""
        return self.enable_chunked_prefill or num_uncomputed > self.max_num_batched_tokens

    def _allocate_or_preempt(self, request: Request, num_new: int, output: SchedulerOutput) -> bool:
        """Get blocks for `request`, preempting the running request the policy gives up first.

        Every running request is a candidate, also one already scheduled in this step (it is
        taken out of the step again, `_unschedule_preempted`): running requests are visited in
        the order they joined, not the policy's, and a request swapped back in joins after
        newer ones admitted in the same step. Sparing the already-scheduled ones would preempt
        that older request instead of the newest, against the policy (vLLM's scheduler also
        preempts scheduled requests)."""
        while not self.kv_cache.allocate(request, num_new):
            victim = self.policy.choose_victim(self.running)
            self._preempt(victim, output)
            if victim is request:
                return False
        return True

    @staticmethod
    def _unschedule_preempted(output: SchedulerOutput) -> int:
        """Drop requests preempted after they were scheduled in this step; returns the budget
        they held. Their blocks went with the preemption (a swap-out copies only computed
        tokens, so the block just allocated for the new token is not copied)."""
        kept = [item for item in output.scheduled if item.request.status == RequestStatus.RUNNING]
        if len(kept) == len(output.scheduled):
            return 0
        freed = output.num_batched_tokens - sum(item.num_new_tokens for item in kept)
        output.scheduled = kept
        return freed

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> int:
        while budget > 0 and len(self.running) + len(self.swapping_in) < self.max_num_seqs:
            request = self.policy.peek()
            if request is None:
                break
            if request.status == RequestStatus.SWAPPED:
                if not self._start_swap_in(request, output):
                    break
                continue
            cached_blocks = self.kv_cache.find_cached_prefix(request)
            host_blocks = self.kv_cache.find_host_prefix(request, cached_blocks)
            if host_blocks:
                if not self._start_prefix_load(request, cached_blocks, host_blocks, output):
                    break
                continue
            num_cached = len(cached_blocks) * self.kv_cache.block_size
            num_new = request.num_tokens - request.num_computed_tokens - num_cached
            if num_new > budget:
                if not self._may_chunk(num_new):
                    break
                num_new = budget
            if not self.kv_cache.allocate(request, num_new, cached_blocks):
                break
            request.num_computed_tokens += num_cached  # the attached prefix needs no compute
            self._admitted(request, RequestStatus.RUNNING)
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return budget

    def _admitted(self, request: Request, status: RequestStatus) -> None:
        self.policy.pop()
        request.status = status
        if request.metrics.first_scheduled_time is None:
            request.metrics.first_scheduled_time = time.time()
            self.policy.on_tokens_served([(request, request.num_prompt_tokens, 0)])

    def _start_prefix_load(self, request: Request, device_blocks: list[int], host_blocks: list[int],
                           output: SchedulerOutput) -> bool:
        """Admit a request whose cached prefix continues in host memory: its device hits are
        attached, its host hits copied in (no step budget: nothing is computed until the copy
        is done; then it runs like any request part-way through its prompt)."""
        groups = self.kv_cache.load_prefix(request, device_blocks, host_blocks)
        if groups is None:
            return False
        request.num_computed_tokens += (len(device_blocks) + len(host_blocks)) * self.kv_cache.block_size
        self._admitted(request, RequestStatus.SWAPPING_IN)
        self.swapping_in.append(request)
        output.swap_in.append((request, groups))
        return True

    def _start_swap_in(self, request: Request, output: SchedulerOutput) -> bool:
        """Give a swapped-out request device blocks and name the copies that refill them.
        It costs no step budget: nothing is computed until the copy is done.

        It rejoins only when every running request can still grow by one block afterwards:
        otherwise the next block boundary preempts again, and the latest arrival (often this
        very request) would be swapped out after a step or two, paying two copies and a
        wait for nearly no progress."""
        groups = self.kv_cache.swap_in(request, headroom_blocks=len(self.running))
        if groups is None:
            return False
        self._admitted(request, RequestStatus.SWAPPING_IN)
        self.swapping_in.append(request)
        self.num_swap_ins_total += 1
        output.swap_in.append((request, groups))
        return True

    def finish_swap_in(self, request_ids: list[str]) -> None:
        """The engine's copies for these requests are done: they run from the next step."""
        done = set(request_ids)
        for request in [r for r in self.swapping_in if r.request_id in done]:
            self.swapping_in.remove(request)
            self.kv_cache.finish_load(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)

    def _preempt(self, request: Request, output: SchedulerOutput) -> None:
        self.running.remove(request)
        request.metrics.num_preemptions += 1
        self.num_preemptions_total += 1
        output.preempted.append(request)
        groups = self.kv_cache.swap_out(request) if self.preemption_mode == "swap" else None
        if groups is not None:
            request.status = RequestStatus.SWAPPED  # progress kept: its KV waits in host memory
            self.num_swap_outs_total += 1
            output.swap_out.append((request, groups))
        else:  # recompute (also when host memory is full)
            self.kv_cache.free(request)
            self.kv_cache.free_host(request)
            request.num_computed_tokens = 0
            request.status = RequestStatus.PREEMPTED
        self.policy.add_preempted(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of scheduling, wherever it is, and return its blocks in both
        tiers. A request still swapping in must have its copy finished first (the engine
        waits for it): its device blocks are being written."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.swapping_in:
            self.swapping_in.remove(request)
        else:
            self.policy.remove(request)
        self.kv_cache.free(request)
        self.kv_cache.free_host(request)
        request.status = status

    def update_from_output(self, scheduler_output: SchedulerOutput) -> None:
        """The step ran: every scheduled request now has K/V for its scheduled tokens.

        Called by the engine after the runner, before it appends the sampled tokens. Newly
        completed full blocks are registered in the prefix cache, and the policy hears of
        every output token the step produced.
        """
        kv_cache = self.kv_cache
        served = []
        for item in scheduler_output.scheduled:
            request = item.request
            start = request.num_computed_tokens
            request.num_computed_tokens += item.num_new_tokens
            self.num_computed_tokens_total += item.num_new_tokens
            if start < request.max_num_computed_tokens:
                self.num_recomputed_tokens_total += min(request.num_computed_tokens, request.max_num_computed_tokens) - start
            request.max_num_computed_tokens = max(request.max_num_computed_tokens, request.num_computed_tokens)
            kv_cache.cache_full_blocks(request)
            if request.num_computed_tokens == request.num_tokens:  # the step sampled a token
                served.append((request, 0, 1))
        self.policy.on_tokens_served(served)

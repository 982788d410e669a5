"""Continuous batching with a per-step token budget and stall-free chunked prefill.

Each step (Sarathi-Serve's order):
  1. running requests that decode get one token each — nothing may stall them;
  2. running requests part-way through their prompt get `min(remaining, budget left)`;
  3. waiting requests are admitted, in the policy's order, while the budget, `max_num_seqs`
     and free KV blocks allow (their cached prefix is attached first and skipped).
When a running request cannot get a block, the policy names a victim that is preempted: its
blocks are freed and it is recomputed later (its prefix will often still be cached).
The scheduler never touches tensors.

A request's progress, `num_computed_tokens`, has one owner: this scheduler. It moves the
number when it attaches a cached prefix, when it preempts, and in `update_from_output`, which
the engine calls once per executed step (vLLM's `update_from_output`, nano-vllm's
`postprocess`). The KV-cache manager and the engine only read it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fitserve.engine.kv_cache import KVCacheManager
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
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_num_seqs = max_num_seqs
        self.enable_chunked_prefill = enable_chunked_prefill
        # Not `policy or ...`: a policy with an empty queue has len 0 and would be falsy.
        self.policy: SchedulingPolicy = policy if policy is not None else FCFSPolicy()
        self.running: list[Request] = []
        self.num_preemptions_total = 0

    @property
    def num_waiting(self) -> int:
        return len(self.policy)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished_requests(self) -> bool:
        return bool(self.running) or len(self.policy) > 0

    def add_request(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.policy.add(request)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[str] = set()

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
            if self._allocate_or_preempt(request, num_new, scheduled_ids, output):
                output.scheduled.append(ScheduledRequest(request, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new

        # Admitting new work right after preempting would only thrash the cache.
        if not output.preempted:
            budget = self._admit_waiting(budget, output)
        return output

    def _may_chunk(self, num_uncomputed: int) -> bool:
        """Whether these tokens may be split over steps. With chunked prefill off a prompt is
        scheduled whole (the engine rejects prompts over the budget), but a request resumed
        after preemption recomputes prompt + output, which can exceed the budget: it could
        never run whole and would block the queue forever, so it is split anyway."""
        return self.enable_chunked_prefill or num_uncomputed > self.max_num_batched_tokens

    def _allocate_or_preempt(
        self, request: Request, num_new: int, scheduled_ids: set[str], output: SchedulerOutput
    ) -> bool:
        """Get blocks for `request`, preempting lower-priority running requests if needed."""
        while not self.kv_cache.allocate(request, num_new):
            candidates = [
                r for r in self.running
                if r.request_id not in scheduled_ids and r.status == RequestStatus.RUNNING
            ]
            victim = self.policy.choose_victim(candidates)
            self._preempt(victim)
            output.preempted.append(victim)
            if victim is request:
                return False
        return True

    def _admit_waiting(self, budget: int, output: SchedulerOutput) -> int:
        while budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.policy.peek()
            if request is None:
                break
            cached_blocks = self.kv_cache.find_cached_prefix(request)
            num_cached = len(cached_blocks) * self.kv_cache.block_size
            num_new = request.num_tokens - request.num_computed_tokens - num_cached
            if num_new > budget:
                if not self._may_chunk(num_new):
                    break
                num_new = budget
            if not self.kv_cache.allocate(request, num_new, cached_blocks):
                break
            request.num_computed_tokens += num_cached  # the attached prefix needs no compute
            self.policy.pop()
            request.status = RequestStatus.RUNNING
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = time.time()
                self.policy.on_tokens_served([(request, request.num_prompt_tokens, 0)])
            self.running.append(request)
            output.scheduled.append(ScheduledRequest(request, num_new))
            budget -= num_new
        return budget

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.metrics.num_preemptions += 1
        self.num_preemptions_total += 1
        self.policy.add_preempted(request)

    def finish_request(self, request: Request, status: RequestStatus) -> None:
        """Take a running or waiting request out of scheduling and return its blocks."""
        if request in self.running:
            self.running.remove(request)
        else:
            self.policy.remove(request)
        self.kv_cache.free(request)
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
            request.num_computed_tokens += item.num_new_tokens
            kv_cache.cache_full_blocks(request)
            if request.num_computed_tokens == request.num_tokens:  # the step sampled a token
                served.append((request, 0, 1))
        self.policy.on_tokens_served(served)

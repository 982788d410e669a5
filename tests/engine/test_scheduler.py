"""Scheduler: token budget, stall-free chunked prefill, max_num_seqs, preemption, cleanup.

The scheduler is driven here the way the engine drives it, by a model-free engine loop
(`FakeEngine`): schedule, let the scheduler advance each scheduled request's progress and
register its full blocks (`update_from_output`), append a fake token when the step completes its sequence, and finish
requests at their length limit. The fake engine also simulates the KV contents of every
block slot, so a request that ever reads KV computed for a different prefix (a wrong
prefix-cache hit, a block handed to two owners, a shared block overwritten) fails the test
even though no model runs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from fitserve.engine.kv_cache import KVCacheManager
from fitserve.engine.policy import FCFSPolicy, SchedulingPolicy
from fitserve.engine.request import Request, RequestStatus
from fitserve.engine.scheduler import Scheduler, SchedulerOutput
from fitserve.sampling_params import SamplingParams


def make_request(
    request_id: str, prompt: list[int], max_tokens: int, arrival_time: float, **sampling: object
) -> Request:
    """Arrival times are explicit: FCFS order and the preemption victim depend on them, and
    requests made in the same microsecond would otherwise tie."""
    return Request(
        request_id=request_id,
        prompt_token_ids=list(prompt),
        sampling_params=SamplingParams(max_tokens=max_tokens, **sampling),
        arrival_time=arrival_time,
    )


def make_scheduler(
    num_blocks: int,
    block_size: int = 4,
    max_num_batched_tokens: int = 16,
    max_num_seqs: int = 8,
    enable_chunked_prefill: bool = True,
    enable_prefix_caching: bool = True,
    policy: SchedulingPolicy | None = None,
) -> Scheduler:
    return Scheduler(
        KVCacheManager(num_blocks, block_size, enable_prefix_caching),
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        enable_chunked_prefill=enable_chunked_prefill,
        policy=policy,
    )


def fake_token(request: Request) -> int:
    """A 'greedy' next token: a function of the context only, so equal prompts give equal
    outputs and generated blocks can be shared through the prefix cache too."""
    tokens = request.all_token_ids
    return (sum(tokens[-3:]) * 31 + len(tokens)) % 97


@dataclass
class StepRecord:
    output: SchedulerOutput
    decodes_before: list[Request]
    running_before: list[Request]
    chunks: list[tuple[str, int]] = field(default_factory=list)


class FakeEngine:
    """The engine's step loop without a model, checking the scheduler's promises each step."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.kv_cache.block_size
        self.finished: list[Request] = []
        self.history: list[StepRecord] = []
        # block id -> slot -> the context (all tokens up to and including that position)
        # whose K/V the slot holds; K/V at a position depends on the whole prefix before it.
        self.kv: dict[int, dict[int, tuple[int, ...]]] = {}

    def add(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def step(self) -> StepRecord:
        scheduler = self.scheduler
        running_before = list(scheduler.running)
        decodes_before = [r for r in running_before if r.num_uncomputed_tokens == 1]
        output = scheduler.schedule()
        record = StepRecord(output, decodes_before, running_before)
        check_schedule(scheduler, record)
        completing = []
        for item in output.scheduled:
            request = item.request
            if item.completes_sequence:  # the runner reads it before progress moves
                completing.append(request)
            record.chunks.append((request.request_id, item.num_new_tokens))
            self._compute(request, item.num_new_tokens)
        scheduler.update_from_output(output)
        for request in completing:
            request.output_token_ids.append(fake_token(request))
            if request.num_output_tokens >= request.max_output_tokens:
                scheduler.finish_request(request, RequestStatus.FINISHED_LENGTH)
                self.finished.append(request)
        check_ownership(scheduler)
        self.history.append(record)
        return record

    def abort(self, request: Request) -> None:
        self.scheduler.finish_request(request, RequestStatus.FINISHED_ABORTED)
        self.finished.append(request)

    def run(self, max_steps: int) -> None:
        for _ in range(max_steps):
            if not self.scheduler.has_unfinished_requests():
                return
            self.step()
        pytest.fail(f"requests still unfinished after {max_steps} steps")

    def _compute(self, request: Request, num_new_tokens: int) -> None:
        """Read the K/V of every earlier position, then write the new positions."""
        pool = self.scheduler.kv_cache.pool
        tokens = tuple(request.all_token_ids)
        start = request.num_computed_tokens
        for position in range(start):
            block_id = request.block_ids[position // self.block_size]
            held = self.kv.get(block_id, {}).get(position % self.block_size)
            assert held == tokens[: position + 1], (
                f"{request.request_id} reads position {position} from block {block_id} "
                "holding K/V of a different prefix"
            )
        for position in range(start, start + num_new_tokens):
            block_id = request.block_ids[position // self.block_size]
            block = pool.blocks[block_id]
            assert block.ref_count == 1, f"{request.request_id} writes into shared block {block_id}"
            assert block.block_hash is None, f"{request.request_id} overwrites cached block {block_id}"
            self.kv.setdefault(block_id, {})[position % self.block_size] = tokens[: position + 1]


def check_schedule(scheduler: Scheduler, record: StepRecord) -> None:
    """Per-step promises: budget, decodes first and never stalled, chunk sizes, max_num_seqs."""
    output = record.output
    budget = scheduler.max_num_batched_tokens
    items = output.scheduled
    assert output.num_batched_tokens <= budget
    ids = [item.request.request_id for item in items]
    assert len(ids) == len(set(ids)), "a request scheduled twice in one step"
    assert len(scheduler.running) <= scheduler.max_num_seqs
    preempted_ids = {r.request_id for r in output.preempted}
    assert not preempted_ids & set(ids)

    decode_ids = {r.request_id for r in record.decodes_before}
    running_ids = {r.request_id for r in record.running_before}
    kinds = ["decode" if i in decode_ids else "running" if i in running_ids else "admitted" for i in ids]
    order = {"decode": 0, "running": 1, "admitted": 2}
    assert [order[k] for k in kinds] == sorted(order[k] for k in kinds), (
        f"scheduled out of order (decodes, then running prefills, then admissions): {kinds}"
    )
    if any(kind != "decode" for kind in kinds):
        stalled = decode_ids - set(ids) - preempted_ids
        assert not stalled, f"decodes {stalled} waited while a prefill ran"

    used = 0
    for item in items:
        request = item.request
        assert item.num_new_tokens >= 1
        assert request.status == RequestStatus.RUNNING and request in scheduler.running
        remaining = request.num_uncomputed_tokens
        if scheduler.enable_chunked_prefill or remaining > budget:
            if output.preempted:  # a request preempted after it was scheduled gave back budget
                assert item.num_new_tokens <= min(remaining, budget - used)  # earlier chunks could not use
            else:
                assert item.num_new_tokens == min(remaining, budget - used)
        else:
            assert item.num_new_tokens == remaining, "chunking is off: a prompt runs whole"
        used += item.num_new_tokens

    swapped_out = [request for request, _ in output.swap_out]
    for victim in output.preempted:
        assert victim.block_ids == [] and victim not in scheduler.running
        if victim in swapped_out:
            assert victim.status == RequestStatus.SWAPPED  # its progress is kept in host memory
        else:
            assert victim.status == RequestStatus.PREEMPTED and victim.num_computed_tokens == 0
        # Already-scheduled requests are candidates too: the victim is the latest arrival of all.
        assert not isinstance(scheduler.policy, FCFSPolicy) or all(
            victim.arrival_time >= r.arrival_time for r in scheduler.running
        ), "FCFS preempts the latest arrival"
    if output.preempted:
        assert all(kind != "admitted" for kind in kinds), "admitted new work right after preempting"
    if output.is_empty and not scheduler.swapping_in:  # nothing to run while copies are in flight is fine
        assert not scheduler.has_unfinished_requests(), "idle step while requests wait"


def check_ownership(scheduler: Scheduler) -> None:
    """Between steps: every reference is accounted for by an owner, free blocks are exactly
    the unreferenced ones, each request holds just the blocks its progress needs, and a
    block is shared only at the same position of identical prefixes."""
    kv_cache = scheduler.kv_cache
    pool = kv_cache.pool
    block_size = kv_cache.block_size
    references = [0] * pool.num_blocks
    owners: dict[int, list[tuple[Request, int]]] = {}
    for request in scheduler.running + scheduler.swapping_in:
        assert len(request.block_ids) == len(set(request.block_ids)), "a block twice in one table"
        assert len(request.block_ids) == kv_cache.blocks_needed(request.num_computed_tokens)
        for index, block_id in enumerate(request.block_ids):
            references[block_id] += 1
            owners.setdefault(block_id, []).append((request, index))
    for block in pool.blocks:
        assert block.ref_count == references[block.block_id], (
            f"block {block.block_id}: ref_count {block.ref_count}, owners hold {references[block.block_id]}"
        )
    assert pool.num_free_blocks == references.count(0)
    for block_id, holders in owners.items():
        if len(holders) < 2:
            continue
        first_request, index = holders[0]
        end = (index + 1) * block_size
        for other, other_index in holders[1:]:
            assert other_index == index, f"block {block_id} shared at different positions"
            assert other.all_token_ids[:end] == first_request.all_token_ids[:end]
            assert other.num_computed_tokens >= end and first_request.num_computed_tokens >= end


def check_all_returned(scheduler: Scheduler) -> None:
    """Nothing left to run, and every block back in the free pool with no reference."""
    pool = scheduler.kv_cache.pool
    assert not scheduler.has_unfinished_requests()
    assert pool.num_free_blocks == pool.num_blocks
    assert all(block.ref_count == 0 for block in pool.blocks)
    host_pool = scheduler.kv_cache.host_pool
    assert host_pool is None or host_pool.num_free_blocks == host_pool.num_blocks, "host blocks leaked"


# ----------------------------------------------------------------------------- budget and chunking


def test_long_prompt_is_split_into_budget_sized_chunks() -> None:
    """Alone, a 20-token prompt with an 8-token budget runs as 8 + 8 + 4, and only the last
    chunk yields a token (earlier chunks have no logits worth sampling)."""
    engine = FakeEngine(make_scheduler(num_blocks=16, max_num_batched_tokens=8))
    request = make_request("a", list(range(20)), max_tokens=3, arrival_time=0.0)
    engine.add(request)
    chunks = []
    outputs = []
    for _ in range(3):
        record = engine.step()
        chunks += [n for _, n in record.chunks]
        outputs.append(request.num_output_tokens)
    assert chunks == [8, 8, 4]
    assert outputs == [0, 0, 1]
    engine.run(max_steps=10)
    assert request.num_output_tokens == 3
    check_all_returned(engine.scheduler)


def test_running_decode_is_scheduled_before_and_alongside_a_long_prefill() -> None:
    """Stall-free batching: a decoding request keeps getting one token every step while a
    long prompt is prefilled in the budget that is left (min(remaining, budget - used))."""
    engine = FakeEngine(make_scheduler(num_blocks=32, max_num_batched_tokens=8))
    decoder = make_request("decoder", [1, 2, 3, 4], max_tokens=20, arrival_time=0.0)
    engine.add(decoder)
    engine.step()
    assert decoder.num_output_tokens == 1

    long_prompt = make_request("long", list(range(100, 140)), max_tokens=2, arrival_time=1.0)
    engine.add(long_prompt)
    long_chunks = []
    while long_prompt.num_output_tokens == 0:
        record = engine.step()
        assert record.chunks[0] == ("decoder", 1)
        long_chunks += [n for rid, n in record.chunks if rid == "long"]
    assert long_chunks == [7, 7, 7, 7, 7, 5]
    engine.run(max_steps=40)
    check_all_returned(engine.scheduler)


def test_partial_prefill_goes_before_new_admissions() -> None:
    """A prompt already part-way through prefill takes the budget before a newcomer."""
    engine = FakeEngine(make_scheduler(num_blocks=32, max_num_batched_tokens=6))
    first = make_request("first", list(range(10)), max_tokens=1, arrival_time=0.0)
    engine.add(first)
    assert engine.step().chunks == [("first", 6)]
    engine.add(make_request("second", list(range(50, 60)), max_tokens=1, arrival_time=1.0))
    assert engine.step().chunks == [("first", 4), ("second", 2)]
    engine.run(max_steps=10)
    check_all_returned(engine.scheduler)


def test_tokens_per_step_never_exceed_the_budget() -> None:
    """Many prompts of growing length compete for a 10-token step: every step stays within
    the budget, and the budget is actually used up when there is work for it."""
    engine = FakeEngine(make_scheduler(num_blocks=64, max_num_batched_tokens=10, max_num_seqs=16))
    for index in range(8):
        prompt = list(range(index, index + 3 + 4 * index))
        engine.add(make_request(f"r{index}", prompt, max_tokens=5, arrival_time=index))
    engine.run(max_steps=100)
    assert max(record.output.num_batched_tokens for record in engine.history) == 10
    assert all(request.num_output_tokens == 5 for request in engine.finished)
    check_all_returned(engine.scheduler)


def test_chunking_off_schedules_a_prompt_whole_or_not_at_all() -> None:
    """Without chunked prefill a prompt that does not fit in what is left of the budget
    waits for a later step (and, FCFS, so does everything behind it)."""
    engine = FakeEngine(make_scheduler(num_blocks=32, max_num_batched_tokens=8, enable_chunked_prefill=False))
    engine.add(make_request("a", list(range(6)), max_tokens=3, arrival_time=0.0))
    engine.add(make_request("b", list(range(10, 15)), max_tokens=3, arrival_time=1.0))
    engine.add(make_request("c", [20], max_tokens=3, arrival_time=2.0))
    assert engine.step().chunks == [("a", 6)]
    assert engine.step().chunks == [("a", 1), ("b", 5), ("c", 1)]
    engine.run(max_steps=10)
    assert len(engine.finished) == 3
    check_all_returned(engine.scheduler)


def test_cached_prefix_is_skipped_at_admission() -> None:
    """A prompt whose prefix is cached is admitted with only its uncached tokens counted
    against the budget, and reports them as cached prompt tokens."""
    engine = FakeEngine(make_scheduler(num_blocks=32, max_num_batched_tokens=16))
    shared = list(range(12))
    engine.add(make_request("a", shared + [50], max_tokens=1, arrival_time=0.0))
    engine.run(max_steps=5)
    second = make_request("b", shared + [60, 61], max_tokens=1, arrival_time=1.0)
    engine.add(second)
    assert engine.step().chunks == [("b", 2)]
    assert second.metrics.num_cached_prompt_tokens == 12
    engine.run(max_steps=5)
    check_all_returned(engine.scheduler)


# ----------------------------------------------------------------------------- max_num_seqs


def test_max_num_seqs_caps_running_requests() -> None:
    """A third request waits until one of the two running ones finishes, even with budget
    and memory to spare."""
    engine = FakeEngine(make_scheduler(num_blocks=64, max_num_batched_tokens=64, max_num_seqs=2))
    requests = [make_request(f"r{i}", [i, i + 1, i + 2], max_tokens=4 + i, arrival_time=i) for i in range(3)]
    for request in requests:
        engine.add(request)
    engine.step()
    assert engine.scheduler.running == requests[:2]
    assert requests[2].status == RequestStatus.WAITING
    while requests[0].status == RequestStatus.RUNNING:
        engine.step()
        assert requests[2].num_computed_tokens == 0
    engine.step()
    assert requests[2].status == RequestStatus.RUNNING
    engine.run(max_steps=20)
    check_all_returned(engine.scheduler)


# ----------------------------------------------------------------------------- preemption


def test_latest_arrival_is_preempted_and_resumes_first() -> None:
    """When a decode needs a block and none is free, FCFS gives up the latest-arrived
    running request: its blocks return to the pool, its progress resets, it goes to the
    head of the waiting queue (ahead of a request that arrived after it and was already
    waiting) and it still finishes in full."""
    scheduler = make_scheduler(
        num_blocks=5, block_size=4, max_num_batched_tokens=32, max_num_seqs=2, enable_prefix_caching=False
    )
    engine = FakeEngine(scheduler)
    early = make_request("early", list(range(7)), max_tokens=10, arrival_time=0.0)
    late = make_request("late", list(range(20, 27)), max_tokens=10, arrival_time=1.0)
    queued = make_request("queued", [90, 91, 92], max_tokens=2, arrival_time=2.0)
    for request in (early, late, queued):
        engine.add(request)
    engine.step()  # early and late prefilled: 2 + 2 blocks of 5; queued waits (max_num_seqs)
    assert scheduler.running == [early, late]
    assert queued.status == RequestStatus.WAITING

    preempting_step = None
    for _ in range(10):
        record = engine.step()
        if record.output.preempted:
            preempting_step = record
            break
    assert preempting_step is not None
    assert preempting_step.output.preempted == [late]
    assert late.status == RequestStatus.PREEMPTED
    assert late.block_ids == [] and late.num_computed_tokens == 0
    assert late.metrics.num_preemptions == 1
    assert scheduler.running == [early]
    assert [rid for rid, _ in preempting_step.chunks] == ["early"]
    assert late.num_output_tokens > 0  # its output is kept and recomputed, not lost
    assert scheduler.policy.peek() is late

    steps_before = len(engine.history)
    engine.run(max_steps=60)
    assert early.num_output_tokens == 10 and late.num_output_tokens == 10
    scheduled_after = [rid for record in engine.history[steps_before:] for rid, _ in record.chunks]
    assert scheduled_after.index("late") < scheduled_after.index("queued")
    assert scheduler.num_preemptions_total >= 1
    check_all_returned(scheduler)


def test_preempted_request_output_matches_an_unpreempted_run() -> None:
    """Recompute after preemption continues the same sequence: with a context-only fake
    token the preempted request's output equals the one from a pool big enough for all."""
    prompts = [list(range(i * 10, i * 10 + 6)) for i in range(3)]

    def outputs(num_blocks: int) -> tuple[list[list[int]], int]:
        engine = FakeEngine(make_scheduler(num_blocks=num_blocks, block_size=2, max_num_batched_tokens=16))
        requests = [make_request(f"r{i}", p, max_tokens=12, arrival_time=i) for i, p in enumerate(prompts)]
        for request in requests:
            engine.add(request)
        engine.run(max_steps=200)
        check_all_returned(engine.scheduler)
        return [r.output_token_ids for r in requests], engine.scheduler.num_preemptions_total

    roomy, roomy_preemptions = outputs(num_blocks=64)
    tight, tight_preemptions = outputs(num_blocks=12)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy


def test_preempted_request_longer_than_the_budget_resumes_with_chunking_off() -> None:
    """With chunked prefill off a preempted request must recompute prompt + output, which
    can exceed the step budget even though its prompt alone did not; it must still resume
    (split over steps) rather than block the queue forever."""
    scheduler = make_scheduler(
        num_blocks=6, block_size=4, max_num_batched_tokens=8,
        enable_chunked_prefill=False, enable_prefix_caching=False,
    )
    engine = FakeEngine(scheduler)
    requests = [make_request(f"r{i}", list(range(i * 10, i * 10 + 6)), max_tokens=12, arrival_time=i) for i in range(2)]
    for request in requests:
        engine.add(request)
    engine.run(max_steps=100)
    assert scheduler.num_preemptions_total > 0
    assert [r.num_output_tokens for r in requests] == [12, 12]
    check_all_returned(scheduler)


def test_cached_prompt_tokens_are_not_counted_again_after_preemption() -> None:
    """A resumed request finds its own earlier blocks in the prefix cache; those are not
    'prompt tokens served from the cache' a second time, and the count can never exceed the
    prompt."""
    scheduler = make_scheduler(num_blocks=8, block_size=4, max_num_batched_tokens=64)
    engine = FakeEngine(scheduler)
    shared = list(range(8))
    engine.add(make_request("warm", shared + [99], max_tokens=1, arrival_time=0.0))
    engine.run(max_steps=5)
    requests = [make_request(f"r{i}", shared + [i], max_tokens=14, arrival_time=1.0 + i) for i in range(2)]
    for request in requests:
        engine.add(request)
    engine.run(max_steps=100)
    assert requests[1].metrics.num_preemptions > 0
    for request in requests:
        assert request.metrics.num_cached_prompt_tokens == 8
    check_all_returned(scheduler)


# ----------------------------------------------------------------------------- finishing and aborts


def test_abort_while_waiting_and_while_running_returns_every_block() -> None:
    """Aborts can come at any time (client disconnects); a waiting request leaves the queue,
    a running one returns its blocks, shared prefix blocks are released once per owner."""
    scheduler = make_scheduler(num_blocks=16, max_num_batched_tokens=16, max_num_seqs=2)
    engine = FakeEngine(scheduler)
    shared = list(range(9))
    running = [make_request(f"run{i}", shared + [i], max_tokens=50, arrival_time=i) for i in range(2)]
    waiting = make_request("waiting", shared + [7], max_tokens=50, arrival_time=5.0)
    for request in running + [waiting]:
        engine.add(request)
    for _ in range(3):
        engine.step()
    assert waiting.status == RequestStatus.WAITING and all(r.status == RequestStatus.RUNNING for r in running)

    engine.abort(waiting)
    assert waiting.status == RequestStatus.FINISHED_ABORTED
    assert scheduler.num_waiting == 0
    engine.abort(running[0])
    assert running[0].block_ids == [] and running[0] not in scheduler.running
    check_ownership(scheduler)
    engine.step()
    engine.abort(running[1])
    check_all_returned(scheduler)
    assert scheduler.schedule().is_empty


def test_abort_of_a_preempted_request_returns_every_block() -> None:
    """A preempted request waits without blocks; aborting it must not free anything twice."""
    scheduler = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=32, enable_prefix_caching=False)
    engine = FakeEngine(scheduler)
    early = make_request("early", list(range(7)), max_tokens=10, arrival_time=0.0)
    late = make_request("late", list(range(20, 27)), max_tokens=10, arrival_time=1.0)
    engine.add(early)
    engine.add(late)
    while late.status != RequestStatus.PREEMPTED:
        engine.step()
    engine.abort(late)
    assert scheduler.num_waiting == 0
    engine.run(max_steps=20)
    check_all_returned(scheduler)


def test_everything_finished_returns_every_block_with_prefix_sharing() -> None:
    """Shared prefix blocks are referenced by several requests; after all finish at
    different times none is leaked or freed twice, and the prefix stays cached."""
    scheduler = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=16)
    engine = FakeEngine(scheduler)
    shared = list(range(12))
    requests = [make_request(f"r{i}", shared + [i] * (i + 1), max_tokens=2 + 3 * i, arrival_time=i) for i in range(5)]
    for request in requests:
        engine.add(request)
    engine.run(max_steps=100)
    assert sum(r.metrics.num_cached_prompt_tokens for r in requests) > 0
    check_all_returned(scheduler)
    assert scheduler.kv_cache.find_cached_prefix(make_request("again", shared + [0], 1, 9.0))


# ----------------------------------------------------------------------------- randomized stress


STRESS_SEEDS = range(24)


@pytest.mark.parametrize("seed", STRESS_SEEDS)
def test_random_workload_keeps_every_invariant(seed: int) -> None:
    """Random arrivals, prompt and output lengths, shared prefixes and aborts on a pool small
    enough to force preemptions; `FakeEngine` checks budget, ordering, ownership and K/V
    contents every step, and at the end every block must be back."""
    rng = random.Random(seed)
    block_size = rng.choice([2, 4])
    num_blocks = rng.randint(6, 14)
    capacity = num_blocks * block_size
    budget = rng.choice([4, 8, 16, 32])
    chunking = seed % 2 == 0
    scheduler = make_scheduler(
        num_blocks=num_blocks,
        block_size=block_size,
        max_num_batched_tokens=budget,
        max_num_seqs=rng.randint(1, 6),
        enable_chunked_prefill=chunking,
        enable_prefix_caching=seed % 4 < 3,
    )
    engine = FakeEngine(scheduler)
    prefixes = [[rng.randrange(97) for _ in range(rng.randint(1, 3 * block_size))] for _ in range(3)]
    max_prompt = min(capacity - 1, budget if not chunking else capacity)
    submitted: list[Request] = []
    num_requests = 30
    step = 0
    while len(submitted) < num_requests or scheduler.has_unfinished_requests():
        step += 1
        assert step < 3000, "the workload did not drain"
        for _ in range(rng.choice([0, 1, 1, 2, 3])):
            if len(submitted) == num_requests:
                break
            prompt = list(rng.choice(prefixes)) + [rng.randrange(97) for _ in range(rng.randint(0, 2 * block_size))]
            prompt = prompt[: rng.randint(1, max_prompt)]
            max_tokens = rng.randint(1, min(4 * block_size, capacity - len(prompt)))
            request = make_request(f"s{seed}-{len(submitted)}", prompt, max_tokens, arrival_time=float(step))
            submitted.append(request)
            engine.add(request)
        unfinished = [r for r in submitted if not r.is_finished]
        if unfinished and rng.random() < 0.04:
            engine.abort(rng.choice(unfinished))
            check_ownership(scheduler)
        if scheduler.has_unfinished_requests():
            engine.step()

    check_all_returned(scheduler)
    for request in submitted:
        assert request.is_finished
        if request.status == RequestStatus.FINISHED_LENGTH:
            assert request.num_output_tokens == request.max_output_tokens
        assert request.metrics.num_cached_prompt_tokens <= request.num_prompt_tokens - 1

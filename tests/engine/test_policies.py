"""Scheduling policies behind the scheduler's seam: priority order, VTC fair share, no leaks.

Driven by the model-free engine loop of test_scheduler.py (`FakeEngine`), which checks the
scheduler's per-step promises and block ownership after every step, whatever the policy.
"""

from __future__ import annotations

import random

import pytest

from fitserve.engine.policy import FCFSPolicy, make_policy
from fitserve.engine.policy_late_last import LateLastPolicy
from fitserve.engine.policy_priority import PriorityPolicy
from fitserve.engine.policy_vtc import VTCPolicy
from fitserve.engine.request import Request, RequestStatus
from fitserve.engine.scheduler import Scheduler, SchedulerOutput
from tests.engine.test_scheduler import FakeEngine, check_all_returned, make_request, make_scheduler

PROMPT_WEIGHT, OUTPUT_WEIGHT = 1.0, 2.0


def client_request(client: str, index: int, prompt_len: int, max_tokens: int, arrival_time: float,
                   priority: int = 0) -> Request:
    request = make_request(f"{client}-{index}", [hash((client, index, i)) % 90 + 5 for i in range(prompt_len)],
                           max_tokens=max_tokens, arrival_time=arrival_time)
    request.client_id = client
    request.priority = priority
    return request


def cost(request: Request) -> float:
    """The most service one request can be charged: its prompt and every output token."""
    return PROMPT_WEIGHT * request.num_prompt_tokens + OUTPUT_WEIGHT * request.max_output_tokens


def service_received(requests: list[Request]) -> dict[str, float]:
    """Service per client counted from what the requests actually got (not from the policy's
    own counters): the prompt once admitted, plus every generated token."""
    service: dict[str, float] = {}
    for request in requests:
        admitted = request.metrics.first_scheduled_time is not None
        served = PROMPT_WEIGHT * request.num_prompt_tokens * admitted + OUTPUT_WEIGHT * request.num_output_tokens
        service[request.client_id] = service.get(request.client_id, 0.0) + served  # type: ignore[index]
    return service


def is_backlogged(requests: list[Request], client: str) -> bool:
    return any(r.client_id == client and r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
               for r in requests)


def check_work_conserving(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """The engine never leaves a slot or budget unused while a queued request could use it
    (memory is ample in these tests, so only the budget and max_num_seqs may stop admission;
    read right after the step, before finished requests left)."""
    if scheduler.num_waiting:
        full = len(output.scheduled) == scheduler.max_num_seqs
        assert full or output.num_batched_tokens == scheduler.max_num_batched_tokens, (
            "a queued request waited while a slot and budget were free"
        )


def heavy_and_light_workload(seed: int) -> list[Request]:
    """Client 'heavy' sends 4 requests for each of client 'light''s, interleaved in arrival
    order, with random prompt and output lengths."""
    rng = random.Random(seed)
    requests = []
    arrival = 0.0
    for round_index in range(40):
        for client, count in (("heavy", 4), ("light", 1)):
            for k in range(count):
                arrival += 1.0
                requests.append(client_request(client, round_index * 4 + k, rng.randint(2, 24),
                                               rng.randint(1, 12), arrival))
    return requests


def run_two_clients(policy_name: str, seed: int) -> tuple[float, float, int]:
    """(largest service gap while both were backlogged, the largest single request's cost,
    steps with both backlogged)."""
    policy = make_policy(policy_name, PROMPT_WEIGHT, OUTPUT_WEIGHT)
    engine = FakeEngine(make_scheduler(num_blocks=512, block_size=4, max_num_batched_tokens=32,
                                       max_num_seqs=4, policy=policy))
    requests = heavy_and_light_workload(seed)
    for request in requests:
        engine.add(request)
    largest_gap, steps = 0.0, 0
    while is_backlogged(requests, "heavy") and is_backlogged(requests, "light"):
        record = engine.step()
        check_work_conserving(engine.scheduler, record.output)
        service = service_received(requests)
        largest_gap = max(largest_gap, abs(service.get("heavy", 0.0) - service.get("light", 0.0)))
        steps += 1
    engine.run(max_steps=5000)
    check_all_returned(engine.scheduler)
    return largest_gap, max(cost(r) for r in requests), steps


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vtc_keeps_two_backlogged_clients_within_twice_the_largest_request(seed: int) -> None:
    """The VTC paper's bound: one client sending 4x the other's requests gets no more than
    2 x (largest single request's cost) more service while both are backlogged; the engine
    is never idle while a queued request fits."""
    gap, largest_cost, steps = run_two_clients("vtc", seed)
    assert steps > 50  # the bound was checked over a long backlogged stretch
    assert gap <= 2 * largest_cost, f"service gap {gap} exceeds 2 x {largest_cost}"


def test_fcfs_lets_the_heavy_client_run_away() -> None:
    """The same workload under FCFS breaks the bound (so the test above can fail): service
    follows arrivals, 4 to 1."""
    gap, largest_cost, _ = run_two_clients("fcfs", seed=0)
    assert gap > 2 * largest_cost


def test_vtc_weights_share_service_in_proportion() -> None:
    """A client of weight 2 gets twice the service of a client of weight 1: their
    weight-normalised service stays within the bound."""
    policy = VTCPolicy(PROMPT_WEIGHT, OUTPUT_WEIGHT, client_weights={"gold": 2.0})
    engine = FakeEngine(make_scheduler(num_blocks=512, block_size=4, max_num_batched_tokens=32,
                                       max_num_seqs=4, policy=policy))
    requests = [client_request(client, i, 8, 6, arrival_time=2 * i + (client == "gold"))
                for i in range(60) for client in ("gold", "plain")]
    for request in requests:
        engine.add(request)
    largest = 0.0
    while is_backlogged(requests, "gold") and is_backlogged(requests, "plain"):
        engine.step()
        service = service_received(requests)
        largest = max(largest, abs(service.get("gold", 0.0) / 2 - service.get("plain", 0.0)))
    assert service["gold"] > 1.5 * service["plain"]
    assert largest <= 2 * max(cost(r) for r in requests)


def test_vtc_lifts_a_returning_client_so_idle_time_is_not_banked() -> None:
    """A client that was idle while others were served re-enters at the smallest counter of
    the backlogged clients, not at zero: it does not then monopolise the engine."""
    policy = VTCPolicy(PROMPT_WEIGHT, OUTPUT_WEIGHT)
    engine = FakeEngine(make_scheduler(num_blocks=512, block_size=4, max_num_batched_tokens=16,
                                       max_num_seqs=2, policy=policy))
    requests = [client_request(client, i, 6, 4, arrival_time=i) for i in range(30) for client in ("a", "b")]
    for request in requests:
        engine.add(request)
    for _ in range(30):
        engine.step()
    backlogged_min = min(policy.counters["a"], policy.counters["b"])
    assert backlogged_min > 100
    newcomer = [client_request("c", i, 6, 4, arrival_time=1000 + i) for i in range(10)]
    engine.add(newcomer[0])
    assert policy.counters["c"] == backlogged_min
    for request in newcomer[1:]:
        engine.add(request)
    admitted: list[str] = []
    while len(admitted) < 8:
        record = engine.step()
        admitted += [item.request.client_id for item in record.output.scheduled  # type: ignore[misc]
                     if item.request not in record.running_before]
    assert {"a", "b"} & set(admitted), f"the returning client took every slot: {admitted}"
    engine.run(max_steps=2000)
    check_all_returned(engine.scheduler)


def test_vtc_drained_client_reference_when_nobody_waits() -> None:
    """With nobody backlogged, a returning client is lifted to the counter of the client whose
    queue drained last."""
    policy = VTCPolicy()
    early = client_request("a", 0, 5, 3, arrival_time=0.0)
    policy.add(early)
    assert policy.pop() is early
    policy.on_tokens_served([(early, 5, 3)])
    assert policy.counters["a"] == 5 + 2 * 3
    policy.add(client_request("b", 0, 5, 3, arrival_time=1.0))
    assert policy.counters["b"] == policy.counters["a"]


def test_priority_admits_lowest_value_first_ties_by_arrival() -> None:
    """One slot at a time: admission order is (priority, arrival), whatever the add order."""
    policy = PriorityPolicy()
    engine = FakeEngine(make_scheduler(num_blocks=64, max_num_seqs=1, policy=policy))
    specs = [("r0", 3, 0.0), ("r1", 1, 1.0), ("r2", 2, 2.0), ("r3", 1, 3.0), ("r4", -1, 4.0)]
    requests = {rid: client_request("x", i, 5, 2, arrival, priority)
                for i, (rid, priority, arrival) in enumerate(specs)}
    for request in reversed(list(requests.values())):
        engine.add(request)
    order: list[str] = []
    while engine.scheduler.has_unfinished_requests():
        record = engine.step()
        order += [item.request.request_id for item in record.output.scheduled
                  if item.request not in record.running_before]
    ids = {request.request_id: rid for rid, request in requests.items()}
    assert [ids[r] for r in order] == ["r4", "r1", "r3", "r2", "r0"]
    check_all_returned(engine.scheduler)


def test_priority_preempts_the_least_urgent_not_the_latest() -> None:
    """When memory runs out, the running request with the largest priority value gives up its
    blocks, even though it arrived first (FCFS would preempt the later, urgent one)."""
    scheduler = make_scheduler(num_blocks=5, block_size=4, max_num_batched_tokens=32, max_num_seqs=2,
                               enable_prefix_caching=False, policy=PriorityPolicy())
    engine = FakeEngine(scheduler)
    lax = client_request("x", 0, 7, 10, arrival_time=0.0, priority=5)
    urgent = client_request("x", 1, 7, 10, arrival_time=1.0, priority=0)
    engine.add(lax)
    engine.add(urgent)
    preempted: list[Request] = []
    for _ in range(40):
        if not scheduler.has_unfinished_requests():
            break
        preempted += engine.step().output.preempted
    assert preempted and preempted[0] is lax
    engine.run(max_steps=100)
    assert lax.num_output_tokens == urgent.num_output_tokens == 10
    check_all_returned(scheduler)


def test_priority_policy_remove_and_victim_units() -> None:
    policy = PriorityPolicy()
    a, b, c = (client_request("x", i, 3, 1, arrival_time=i, priority=p) for i, p in enumerate((2, 0, 2)))
    for request in (a, b, c):
        policy.add(request)
    assert policy.remove(a) and not policy.remove(a)
    assert len(policy) == 2 and policy.pop() is b and policy.pop() is c and policy.peek() is None
    assert policy.choose_victim([a, b, c]) is c  # least urgent, latest of the ties


class Clock:
    """A settable clock for LateLastPolicy (requests' arrival times are explicit numbers)."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_late_requests_wait_behind_on_time_ones_in_the_order_they_fell_late() -> None:
    """Under overload FCFS serves the request that has already missed its TTFT target first,
    so the next one misses too. With a 1 s target at t = 10: r0 and r1 (arrived at 0 and 8.5)
    are late, r2 and r3 (9.2, 9.5) can still make it: they go first, then the late ones in
    the order they fell late (FCFS's); all are served."""
    clock = Clock(10.0)
    policy = LateLastPolicy(FCFSPolicy(), ttft_target_s=1.0, clock=clock)
    engine = FakeEngine(make_scheduler(num_blocks=64, max_num_seqs=1, policy=policy))
    requests = [client_request("x", i, 5, 2, arrival_time=t) for i, t in enumerate((0.0, 8.5, 9.2, 9.5))]
    for request in requests:
        engine.add(request)
    assert len(policy) == 4
    assert policy.head_on_time_arrival() == 9.2
    order: list[Request] = []
    while engine.scheduler.has_unfinished_requests():
        record = engine.step()
        order += [item.request for item in record.output.scheduled if item.request not in record.running_before]
    assert order == [requests[2], requests[3], requests[0], requests[1]]
    assert policy.head_on_time_arrival() is None and len(policy) == 0
    check_all_returned(engine.scheduler)


def test_late_last_keeps_the_wrapped_order_and_victims() -> None:
    """Among on-time requests the wrapped policy decides (here priority); a request that has
    produced a token is never late, however long it waits; removal reaches both queues."""
    clock = Clock(0.0)
    inner = PriorityPolicy()
    policy = LateLastPolicy(inner, ttft_target_s=1.0, clock=clock)
    lax, urgent, resumed, gone = (client_request("x", i, 3, 4, arrival_time=0.1 * i, priority=p)
                                  for i, p in enumerate((5, 0, 9, 1)))
    resumed.output_token_ids = [7]  # preempted after its first token
    for request in (lax, urgent, gone):
        policy.add(request)
    policy.add_preempted(resumed)
    assert policy.peek() is urgent
    clock.now = 5.0  # all four have waited past the target; only `resumed` has a token
    assert policy.peek() is resumed and policy.pop() is resumed
    assert policy.remove(gone) and not policy.remove(gone)  # it sat in the late queue
    assert policy.peek() is urgent and policy.pop() is urgent  # late ones in the wrapped order
    assert policy.pop() is lax and len(policy) == 0
    assert policy.choose_victim([lax, urgent]) is lax  # the wrapped policy's victim
    with pytest.raises(ValueError, match="TTFT target must be positive"):
        LateLastPolicy(FCFSPolicy(), ttft_target_s=0.0)


@pytest.mark.parametrize("policy_name", ["fcfs", "priority", "vtc", "late-last vtc"])
@pytest.mark.parametrize("seed", [0, 1])
def test_aborts_and_preemptions_never_leak_blocks(policy_name: str, seed: int) -> None:
    """Random clients, priorities and lengths in a pool small enough to preempt, with random
    aborts of waiting, running and preempted requests: ownership holds after every step
    (FakeEngine checks it) and every block comes back."""
    rng = random.Random(seed)
    if policy_name.startswith("late-last "):
        # requests turn late after 5 steps' worth of arrivals (one arrival a step, at t = index)
        clock = Clock()
        policy = LateLastPolicy(make_policy(policy_name.removeprefix("late-last ")), 5.0, clock)
    else:
        clock, policy = None, make_policy(policy_name)
    scheduler = make_scheduler(num_blocks=16, block_size=4, max_num_batched_tokens=16, max_num_seqs=6,
                               policy=policy)
    engine = FakeEngine(scheduler)
    live: list[Request] = []
    aborted = 0
    for index in range(120):
        if clock is not None:
            clock.now = float(index)
        if index < 80 and rng.random() < 0.7:
            request = client_request(rng.choice("abc"), index, rng.randint(1, 20), rng.randint(1, 30),
                                     arrival_time=float(index), priority=rng.randint(0, 3))
            engine.add(request)
            live.append(request)
        if live and rng.random() < 0.15:
            victim = live.pop(rng.randrange(len(live)))
            if not victim.is_finished:
                engine.abort(victim)
                aborted += 1
        if scheduler.has_unfinished_requests():
            engine.step()
        live = [r for r in live if not r.is_finished]
    engine.run(max_steps=3000)
    assert aborted > 3 and scheduler.num_preemptions_total > 3
    check_all_returned(scheduler)
    assert len(scheduler.policy) == 0


def test_make_policy_names() -> None:
    assert isinstance(make_policy("fcfs"), FCFSPolicy)
    with pytest.raises(ValueError, match="unknown scheduling policy 'lottery'"):
        make_policy("lottery")

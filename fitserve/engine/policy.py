"""Scheduling policies: the order of the waiting queue and who is preempted first.

The scheduler asks a policy two questions — which waiting request to admit next, and which
running request to give up when KV blocks run out — and tells it, through one hook, about the
tokens each request was served. A policy is one file (FCFS here, `policy_priority.py`,
`policy_vtc.py`); the scheduler holds no policy-specific code, and `make_policy` is the only
place that knows the names.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from fitserve.engine.request import Request

POLICY_NAMES = ("fcfs", "priority", "vtc")

TokensServed = tuple[Request, int, int]
"""(request, prompt tokens, output tokens) it was just served."""


class SchedulingPolicy(Protocol):
    def add(self, request: Request) -> None:
        """A new request joins the waiting queue."""

    def add_preempted(self, request: Request) -> None:
        """A running request was preempted and waits to resume."""

    def peek(self) -> Request | None:
        """The request to admit next (not removed)."""

    def pop(self) -> Request:
        """Remove and return the request `peek` named."""

    def remove(self, request: Request) -> bool:
        """Remove a waiting request (abort); False if it was not waiting."""

    def choose_victim(self, running: list[Request]) -> Request:
        """The running request to preempt when memory runs out."""

    def on_tokens_served(self, served: list[TokensServed]) -> None:
        """Requests were served tokens: a request's whole prompt when it is first admitted
        (cached prefix included; recomputation after a preemption is not counted again), and
        after each step one output token for every request that sampled one (one call per
        step, so a policy that counts pays one call, not one per request). Called by the
        scheduler; most policies ignore it."""

    def __len__(self) -> int: ...


class FCFSPolicy:
    """First come, first served: admit in arrival order; preempt the latest arrival."""

    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def add(self, request: Request) -> None:
        self._queue.append(request)

    def add_preempted(self, request: Request) -> None:
        # A preempted request arrived before everything still waiting, so it goes first.
        self._queue.appendleft(request)

    def peek(self) -> Request | None:
        return self._queue[0] if self._queue else None

    def pop(self) -> Request:
        return self._queue.popleft()

    def remove(self, request: Request) -> bool:
        try:
            self._queue.remove(request)
        except ValueError:
            return False
        return True

    def choose_victim(self, running: list[Request]) -> Request:
        return max(running, key=lambda request: request.arrival_time)

    def on_tokens_served(self, served: list[TokensServed]) -> None:
        pass

    def __len__(self) -> int:
        return len(self._queue)


def make_policy(
    name: str,
    prompt_token_weight: float = 1.0,
    output_token_weight: float = 2.0,
    client_weights: dict[str, float] | None = None,
) -> SchedulingPolicy:
    """The policy called `name` (one of POLICY_NAMES); the weights only matter to `vtc`."""
    if name == "fcfs":
        return FCFSPolicy()
    if name == "priority":
        from fitserve.engine.policy_priority import PriorityPolicy

        return PriorityPolicy()
    if name == "vtc":
        from fitserve.engine.policy_vtc import VTCPolicy

        return VTCPolicy(prompt_token_weight, output_token_weight, client_weights)
    raise ValueError(f"unknown scheduling policy {name!r}: use one of {', '.join(POLICY_NAMES)}")

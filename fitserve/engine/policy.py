"""Scheduling policies: the order of the waiting queue and who is preempted first.

The scheduler asks a policy two questions: which waiting request to admit next, and which
running request to give up when KV blocks run out. Fairness policies (e.g. VTC) plug in here
without touching the scheduler.
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

from fitserve.engine.request import Request


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

    def __len__(self) -> int:
        return len(self._queue)

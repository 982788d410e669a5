"""With `--slo`: requests that have already missed their TTFT target wait behind the rest.

Under overload, first come first served admits the request that has waited longest, which
is the one most likely to have missed the TTFT target already; serving it first makes the
next one miss too, and soon every request misses (measured on the bundled model at 4 req/s
with `ttft=1s,tpot=50ms`: 22-27% of requests met the SLO under every fixed step budget).
Deadline schedulers have the same failure and the same fix: work that can no longer meet
its deadline yields to work that still can. A request without its first token whose wait
is past the target is *late*: it is admitted only when no on-time request waits, late
requests in the order they fell late (the wrapped policy's), so it still completes (nothing is dropped) but no longer takes a place
from a request that can still meet the SLO.

This wraps the chosen policy (fcfs, priority, vtc): the order among on-time requests, the
victims of preemption and the service accounting stay the wrapped policy's (a late request
leaves the wrapped policy's queue, so under vtc a client whose waiting requests are all late
counts as not backlogged until one arrives on time). Lateness is
checked lazily, at the head of the wrapped policy's queue, so a step costs one comparison
unless requests turn late. A request that has produced a token (a preempted or swapped
request) is never late: its TTFT is already decided, and making it wait longer only hurts
its TPOT.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from fitserve.engine.policy import SchedulingPolicy, TokensServed
from fitserve.engine.request import Request


class LateLastPolicy:
    def __init__(self, inner: SchedulingPolicy, ttft_target_s: float,
                 clock: Callable[[], float] = time.time) -> None:
        if ttft_target_s <= 0:
            raise ValueError(f"the TTFT target must be positive (got {ttft_target_s} s)")
        self.inner = inner
        self.ttft_target_s = ttft_target_s
        self._clock = clock
        self._late: deque[Request] = deque()
        self._next_is_late = False
        """`peek` named the head of the late queue (so `pop` takes it from there)."""

    def is_late(self, request: Request, now: float) -> bool:
        return request.num_output_tokens == 0 and now - request.metrics.arrival_time > self.ttft_target_s

    def head_on_time_arrival(self) -> float | None:
        """Arrival time of the request that can still meet the TTFT target at the head of the
        wrapped policy's queue, the next to be admitted (under fcfs the longest-waiting; the
        SLO loop's wait signal: late requests say the server is overloaded, not that admitting
        more at once would help)."""
        request = self._on_time_head()
        return None if request is None else request.metrics.arrival_time

    @property
    def num_late(self) -> int:
        """Requests known to be late (found at the queue's head past their target)."""
        return len(self._late)

    def _on_time_head(self) -> Request | None:
        now = self._clock()
        while (request := self.inner.peek()) is not None and self.is_late(request, now):
            self._late.append(self.inner.pop())
        return request

    def add(self, request: Request) -> None:
        self.inner.add(request)

    def add_preempted(self, request: Request) -> None:
        self.inner.add_preempted(request)

    def peek(self) -> Request | None:
        request = self._on_time_head()
        self._next_is_late = request is None and bool(self._late)
        return self._late[0] if self._next_is_late else request

    def pop(self) -> Request:
        return self._late.popleft() if self._next_is_late else self.inner.pop()

    def remove(self, request: Request) -> bool:
        if self.inner.remove(request):
            return True
        if request not in self._late:
            return False
        self._late.remove(request)
        return True

    def choose_victim(self, running: list[Request]) -> Request:
        return self.inner.choose_victim(running)

    def on_tokens_served(self, served: list[TokensServed]) -> None:
        self.inner.on_tokens_served(served)

    def __len__(self) -> int:
        return len(self.inner) + len(self._late)

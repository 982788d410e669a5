"""Priority scheduling (vLLM's `--scheduling-policy priority`): lower `priority` runs first.

Waiting requests are admitted by (priority, arrival time); when memory runs out, the running
request with the highest priority value (least urgent) is preempted, the latest arrival
among equals. A preempted request re-enters with its original key, so it resumes ahead of
everything that is less urgent or arrived later.
"""

from __future__ import annotations

import heapq
import itertools

from fitserve.engine.policy import TokensServed
from fitserve.engine.request import Request


def _urgency(request: Request) -> tuple[int, float]:
    return (request.priority, request.arrival_time)


class PriorityPolicy:
    def __init__(self) -> None:
        # (priority, arrival time, insertion number, request): the number breaks exact ties
        # in insertion order and keeps heapq from ever comparing two requests.
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()

    def add(self, request: Request) -> None:
        heapq.heappush(self._heap, (*_urgency(request), next(self._counter), request))

    def add_preempted(self, request: Request) -> None:
        self.add(request)

    def peek(self) -> Request | None:
        return self._heap[0][3] if self._heap else None

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3]

    def remove(self, request: Request) -> bool:
        for index, entry in enumerate(self._heap):
            if entry[3] is request:
                self._heap[index] = self._heap[-1]
                self._heap.pop()
                heapq.heapify(self._heap)
                return True
        return False

    def choose_victim(self, running: list[Request]) -> Request:
        return max(running, key=_urgency)

    def on_tokens_served(self, served: list[TokensServed]) -> None:
        pass

    def __len__(self) -> int:
        return len(self._heap)

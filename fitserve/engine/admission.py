"""Admission of multi-request calls, interleaved so that one call cannot monopolise the queue.

One HTTP request can fan out into many engine requests (a list of prompts times `n`). Put
into the scheduler's first-come-first-served queue at once, a batch of thousands would hold
every slot until its last member ran, and a client arriving a moment later would wait for
all of them. Instead such a group's requests are accepted (validated, so the HTTP layer can
still answer 400) and wait here; the engine thread moves them into the scheduler only while
its waiting queue is short, one request per group in turn. A single request, or a request of
another group, so waits behind at most a queue's worth of any batch.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable

from fitserve.engine.request import Request


class GroupBacklog:
    """Accepted requests of fan-out groups, handed out round-robin across groups."""

    def __init__(self) -> None:
        self._groups: OrderedDict[Hashable, deque[Request]] = OrderedDict()
        self._group_of: dict[str, Hashable] = {}

    def push(self, group: Hashable, request: Request) -> None:
        self._groups.setdefault(group, deque()).append(request)
        self._group_of[request.request_id] = group

    def pop(self) -> Request:
        """The next request of the group whose turn it is; that group then goes last."""
        group, requests = next(iter(self._groups.items()))
        request = requests.popleft()
        del self._group_of[request.request_id]
        if requests:
            self._groups.move_to_end(group)
        else:
            del self._groups[group]
        return request

    def remove(self, request_id: str) -> bool:
        """Drop a held request (its client went away); False if it is not held here."""
        group = self._group_of.pop(request_id, None)
        if group is None:
            return False
        requests = self._groups[group]
        requests.remove(next(request for request in requests if request.request_id == request_id))
        if not requests:
            del self._groups[group]
        return True

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._group_of

    def __len__(self) -> int:
        return len(self._group_of)

"""Fair share between clients: the Virtual Token Counter (Sheng et al., OSDI'24).

Each client has a counter of the service it received: `prompt_token_weight` per prompt token
when a request is first admitted and `output_token_weight` per generated token, divided by
the client's weight (a client of weight 2 is entitled to twice the service). The waiting
request admitted next is the oldest one of the backlogged client (one with requests waiting)
whose counter is smallest. A client whose queue goes from empty to non-empty has its counter
lifted to the smallest counter among backlogged clients — or, when nobody is backlogged, to
that of the client whose queue drained last — so service it did not ask for while idle cannot
be saved up and spent later to starve the others. Within a client, requests run in arrival
order. When memory runs out, the running request of the most-served client is preempted (its
latest arrival).

What holds (the paper's Theorem): between two continuously backlogged clients the counters
differ by at most about twice the cost of the largest single request, whatever their rates.
"""

from __future__ import annotations

from collections import deque

from fitserve.engine.policy import TokensServed
from fitserve.engine.request import Request

ANONYMOUS_CLIENT = ""
"""Requests with no client id share one counter."""


class VTCPolicy:
    def __init__(
        self,
        prompt_token_weight: float = 1.0,
        output_token_weight: float = 2.0,
        client_weights: dict[str, float] | None = None,
    ) -> None:
        self.prompt_token_weight = prompt_token_weight
        self.output_token_weight = output_token_weight
        self.client_weights = dict(client_weights or {})
        self.counters: dict[str, float] = {}
        """Service received per client, in weighted tokens (read by tests and benchmarks)."""
        self._queues: dict[str, deque[Request]] = {}  # backlogged clients only: never empty
        self._last_drained: str | None = None
        self._num_waiting = 0

    @staticmethod
    def client_of(request: Request) -> str:
        return request.client_id or ANONYMOUS_CLIENT

    def add(self, request: Request) -> None:
        client = self.client_of(request)
        queue = self._queues.get(client)
        if queue is None:
            self._lift(client)
            queue = self._queues[client] = deque()
        queue.append(request)
        self._num_waiting += 1

    def add_preempted(self, request: Request) -> None:
        # Resumes before its client's later requests; not a return from idleness, so no lift.
        client = self.client_of(request)
        self._queues.setdefault(client, deque()).appendleft(request)
        self.counters.setdefault(client, 0.0)
        self._num_waiting += 1

    def _lift(self, client: str) -> None:
        if self._queues:
            reference = min(self.counters[other] for other in self._queues)
        elif self._last_drained is not None:
            reference = self.counters[self._last_drained]
        else:
            reference = 0.0
        self.counters[client] = max(self.counters.get(client, 0.0), reference)

    def _next_client(self) -> str | None:
        best: str | None = None
        best_key: tuple[float, float] | None = None
        for client, queue in self._queues.items():
            key = (self.counters[client], queue[0].arrival_time)
            if best_key is None or key < best_key:
                best, best_key = client, key
        return best

    def peek(self) -> Request | None:
        client = self._next_client()
        return None if client is None else self._queues[client][0]

    def pop(self) -> Request:
        client = self._next_client()
        if client is None:
            raise IndexError("pop from an empty VTC queue")
        queue = self._queues[client]
        request = queue.popleft()
        self._num_waiting -= 1
        if not queue:
            self._drop_queue(client)
        return request

    def remove(self, request: Request) -> bool:
        client = self.client_of(request)
        queue = self._queues.get(client)
        if queue is None:
            return False
        try:
            queue.remove(request)
        except ValueError:
            return False
        self._num_waiting -= 1
        if not queue:
            self._drop_queue(client)
        return True

    def _drop_queue(self, client: str) -> None:
        del self._queues[client]
        self._last_drained = client

    def choose_victim(self, running: list[Request]) -> Request:
        counters = self.counters
        return max(running, key=lambda r: (counters.get(self.client_of(r), 0.0), r.arrival_time))

    def on_tokens_served(self, served: list[TokensServed]) -> None:
        counters, weights = self.counters, self.client_weights
        prompt_weight, output_weight = self.prompt_token_weight, self.output_token_weight
        for request, num_prompt_tokens, num_output_tokens in served:
            client = request.client_id or ANONYMOUS_CLIENT
            cost = num_prompt_tokens * prompt_weight + num_output_tokens * output_weight
            counters[client] = counters.get(client, 0.0) + cost / weights.get(client, 1.0)

    def __len__(self) -> int:
        return self._num_waiting

"""Resizing a running engine's BitStack weights without stopping its steps.

A new budget is checked at once (a bad one fails with the valid range, nothing changes).
The blocks it adds are read from disk by a background thread while the engine keeps
stepping; the switch itself — detach blocks past the new prefix, attach the ones read —
happens in `poll`, which the engine calls between steps, so a step never sees a half-changed
model and never waits for disk; the detached blocks are freed by another background thread. Only one resize is in flight: a newer budget cancels the older
one's reading, and both tickets complete when the newer one is applied.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from fitserve.models.elastic_weights import ElasticWeights, WeightMemoryInfo, release_blocks

logger = logging.getLogger("fitserve")


class ResizeTicket:
    """A requested budget; done once the model holds exactly what it allows."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.info: WeightMemoryInfo | None = None
        """The model's state right after the switch (set when done)."""
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._callbacks: list[Callable[[ResizeTicket], None]] = []

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def add_done_callback(self, callback: Callable[[ResizeTicket], None]) -> None:
        """Call `callback(ticket)` when done (in the thread that completes it; at once if done)."""
        if self.done:
            callback(self)
        else:
            self._callbacks.append(callback)

    def _finish(self, info: WeightMemoryInfo | None, error: BaseException | None = None) -> None:
        self.info, self.error = info, error
        self._done.set()
        for callback in self._callbacks:
            callback(self)
        self._callbacks.clear()


class _Job:
    """Reading the blocks of one target in a background thread."""

    def __init__(self, elastic: ElasticWeights, count: int, tickets: list[ResizeTicket]) -> None:
        self.count = count
        self.tickets = tickets
        self.cancel = threading.Event()
        self.blocks: dict | None = None
        self.error: BaseException | None = None
        self.started = time.perf_counter()
        self.thread = threading.Thread(target=self._read, args=(elastic,), name="fitserve-weight-resize",
                                       daemon=True)
        self.thread.start()

    def _read(self, elastic: ElasticWeights) -> None:
        try:
            self.blocks = elastic.read_blocks(self.count, self.cancel)
        except BaseException as error:  # noqa: BLE001 - handed to whoever waits on the ticket
            self.error = error

    @property
    def finished(self) -> bool:
        return not self.thread.is_alive()


class WeightResizer:
    """Owns the resize in flight for one model's `ElasticWeights`.

    `request` may be called from any thread; `poll` and `wait` only from the thread that steps
    the engine (they change the model)."""

    def __init__(self, elastic: ElasticWeights) -> None:
        self.elastic = elastic
        self._job: _Job | None = None
        self._lock = threading.Lock()

    @property
    def pending(self) -> bool:
        return self._job is not None

    def info(self) -> WeightMemoryInfo:
        job = self._job
        return self.elastic.info(job.tickets[-1].budget if job is not None else None)

    def request(self, budget: int) -> ResizeTicket:
        """Start moving to `budget` bytes (WeightBudgetError, changing nothing, if out of range)."""
        count = self.elastic.check_budget(budget)
        ticket = ResizeTicket(budget)
        with self._lock:
            tickets = [ticket]
            if self._job is not None:
                self._job.cancel.set()
                self._job.thread.join()
                tickets = [*self._job.tickets, ticket]
            self._job = _Job(self.elastic, count, tickets)
        return ticket

    def poll(self) -> bool:
        """Between steps: switch to the requested budget if its blocks are read. True when the
        model's weights changed (cached KV computed with the old ones must not be reused); a
        budget that loads the same blocks changes nothing."""
        with self._lock:
            job = self._job
            if job is None or not job.finished:
                return False
            self._job = None
        budget = job.tickets[-1].budget
        if job.error is not None:
            logger.error("resizing the weights to %d bytes failed: %s", budget, job.error)
            for ticket in job.tickets:
                ticket._finish(self.elastic.info(), job.error)
            return False
        read_s = time.perf_counter() - job.started
        switch_start = time.perf_counter()
        before, changed = self.elastic.current_bytes, job.count != self.elastic.loaded_count
        dropped = self.elastic.apply(job.count, job.blocks)
        self.elastic.budget_bytes = budget
        if dropped:  # freed beside the next steps rather than between them
            threading.Thread(target=release_blocks, args=(dropped,), name="fitserve-weight-release",
                             daemon=True).start()
            del dropped
        info = self.elastic.info()
        logger.info("weights resized from %.2f MiB to %.2f MiB (%d/%d blocks; read %.3f s, switch %.3f s)",
                    before / 2**20, info.current_bytes / 2**20, info.blocks_loaded, info.blocks_total, read_s,
                    time.perf_counter() - switch_start)
        for ticket in job.tickets:
            ticket._finish(info)
        return changed

    def wait(self) -> bool:
        """Block until the resize in flight is read, then switch (as `poll`)."""
        job = self._job
        if job is not None:
            job.thread.join()
        return self.poll()

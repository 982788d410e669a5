"""`--slo`: a feedback loop that moves the step's token budget toward the latency targets.

Every window the engine's own timings of the requests that finished in it (TTFT from arrival
to first token, TPOT over the rest, the formulas of bench/metrics.py) are compared at the
SLO's percentile with the targets, as semi-PD re-splits its workers every window:

- TTFT misses: prompts wait too long; grow the budget (more prefill per step, and fewer
  steps per prompt, so more throughput). This wins over a TPOT miss: when both miss the
  server is overloaded, and a smaller budget would only add steps and deepen the backlog.
- TPOT misses (and TTFT holds): steps are too long for the decoding requests; shrink the
  budget (less prefill rides along with each decode step);
- both hold: keep it.

TTFT is also read ahead of the finished requests: a request still waiting for its first
token longer than the target has already missed it. Finished requests alone report a
backlog only a whole request lifetime late, by when shrinking the budget for TPOT has cut
the prefill rate below the arrival rate (measured: at 3.5 req/s on the bundled model the
loop without this signal made 1.8 req/s of goodput where a fixed budget made 2.2-3.2).

The budget moves by a factor (multiplicative increase and decrease) between a floor and a
ceiling. A window with too few finished requests changes nothing.

A move is judged only by requests that decoded under it. A request's lifetime (its TTFT plus
every output token) is usually longer than a window, so the requests that finish in the
window after a move were served mostly under the budget before it: judged by them, the loop
moves again for a miss it has already answered, and overshoots (to the floor, then back up
for the backlog that the floor made). After a move, finished requests whose first token came
before it still count for attainment, but only those whose first token came after it (and
the leading TTFT signal) may move the budget again.

A move that made things worse is taken back. The rules above assume that a smaller budget
shortens the decoding requests' steps and a larger one drains a backlog faster; where a
step's fixed cost dominates (a small model on a CPU), a smaller budget can instead add steps
and make both latencies worse (in one run at 3.5 req/s on the bundled model fixed 256 met the
SLO for 17% of requests and 2048 for 55%; that rate is too unsteady to say more). So
the share of requests meeting every target under a new budget (again only requests that
decoded under it) is compared with the share under the budget before: if it fell by more
than `revert_margin`, the old budget comes back and that direction is not tried again for
`hold_windows` windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fitserve.bench.metrics import Slo, time_per_output_token
from fitserve.engine.request import Request


@dataclass
class SloBudgetController:
    slo: Slo
    budget: int
    """The current step token budget (what the scheduler uses)."""
    min_budget: int
    max_budget: int
    window_s: float = 2.0
    step_factor: float = 1.25
    min_requests: int = 4
    """Finished requests a window needs before it may move the budget."""
    revert_margin: float = 0.1
    """How far attainment may fall after a move before the move is taken back."""
    hold_windows: int = 10
    """Windows during which a direction that was taken back is not tried again."""
    attainment: float | None = None
    """Share of the latest window's requests that met every target (None before one)."""
    num_met_total: int = 0
    num_finished_total: int = 0
    _window: list[tuple[float, float | None, float]] = field(default_factory=list)  # (ttft, tpot, first token)
    _window_start: float | None = None
    _moved_at: float = float("-inf")
    """When the budget last moved: requests with an earlier first token do not judge it."""
    _current_attainment: float | None = None
    """Attainment of the latest judged requests that decoded under the current budget."""
    _last_move: tuple[int, float] | None = None
    """(budget before, its attainment) of a move not yet judged, to take back if it hurt."""
    _held: dict[int, int] = field(default_factory=dict)
    """Direction (+1 grow, -1 shrink) -> windows it stays untried after a move was taken back."""

    def observe(self, request: Request) -> None:
        """A request finished (not aborted): remember its TTFT and TPOT."""
        metrics = request.metrics
        if metrics.first_token_time is None or metrics.finished_time is None:
            return
        ttft = metrics.first_token_time - metrics.arrival_time
        tpot = time_per_output_token(metrics.finished_time - metrics.arrival_time, ttft, request.num_output_tokens)
        self._window.append((ttft, tpot, metrics.first_token_time))
        met = self._meets(ttft, tpot)
        self.num_met_total += met
        self.num_finished_total += 1

    def _meets(self, ttft: float, tpot: float | None) -> bool:
        if self.slo.ttft_ms is not None and ttft * 1e3 > self.slo.ttft_ms:
            return False
        return not (self.slo.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.slo.tpot_ms)

    def update(self, now: float, oldest_waiting_arrival: Callable[[], float | None] | None = None) -> int:
        """Close the window if it is over and move the budget; returns the budget to use.
        `oldest_waiting_arrival` gives the arrival time of the longest-waiting request that
        has no first token yet (None: none waits); it is called only when a window closes."""
        if self._window_start is None:
            self._window_start = now
        if now - self._window_start < self.window_s:
            return self.budget
        waiting_since = oldest_waiting_arrival() if oldest_waiting_arrival is not None else None
        backlog = (self.slo.ttft_ms is not None and waiting_since is not None
                   and (now - waiting_since) * 1e3 > self.slo.ttft_ms)
        if len(self._window) >= self.min_requests:
            self.attainment = sum(self._meets(t, p) for t, p, _ in self._window) / len(self._window)
        # Only requests that decoded under the current budget judge it.
        current = [(ttft, tpot) for ttft, tpot, first_token in self._window if first_token >= self._moved_at]
        judged = len(current) >= self.min_requests
        if not (judged or backlog):
            if len(self._window) >= self.min_requests:
                self._window, self._window_start = [], now
            return self.budget  # too few requests to judge the budget by, and no request late yet
        ttft_misses, tpot_misses = backlog, False
        if judged:
            ttfts = [ttft * 1e3 for ttft, _ in current]
            tpots = [tpot * 1e3 for _, tpot in current if tpot is not None]
            percentile = self.slo.percentile
            ttft_misses |= self.slo.ttft_ms is not None and float(np.percentile(ttfts, percentile)) > self.slo.ttft_ms
            tpot_misses = (self.slo.tpot_ms is not None and bool(tpots)
                           and float(np.percentile(tpots, percentile)) > self.slo.tpot_ms)
        self._window = []
        self._window_start = now
        self._held = {direction: left - 1 for direction, left in self._held.items() if left > 1}
        if judged:
            self._current_attainment = sum(self._meets(t, p) for t, p in current) / len(current)
            if self._take_back_a_harmful_move(now):
                return self.budget
        direction = 1 if ttft_misses else -1 if tpot_misses else 0
        if direction and direction not in self._held:
            self._move(direction, now)
        return self.budget

    def _take_back_a_harmful_move(self, now: float) -> bool:
        """Judge the latest move by the requests that decoded under it; restore the budget
        before it if attainment fell by more than the margin (True: taken back)."""
        if self._last_move is None:
            return False
        before, attainment_before = self._last_move
        self._last_move = None
        assert self._current_attainment is not None
        if self._current_attainment >= attainment_before - self.revert_margin:
            return False
        self._held[1 if self.budget > before else -1] = self.hold_windows
        self.budget, self._moved_at = before, now
        self._current_attainment = attainment_before
        return True

    def _move(self, direction: int, now: float) -> None:
        before = self.budget
        if direction > 0:
            self.budget = min(self.max_budget, int(self.budget * self.step_factor) + 1)
        else:
            self.budget = max(self.min_budget, int(self.budget / self.step_factor))
        if self.budget != before:
            self._moved_at = now
            self._last_move = (before, self._current_attainment) if self._current_attainment is not None else None
            self._current_attainment = None

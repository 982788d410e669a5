"""`--slo`: a feedback loop that moves two knobs toward the latency targets: the step's token
budget and the number of requests allowed to run at once (a cap under `max_num_seqs`).

Every window the engine's own timings of the requests that finished in it (TTFT from arrival
to first token, TPOT over the rest, the formulas of bench/metrics.py) are compared at the
SLO's percentile with the targets, as semi-PD moves compute between prefill and decode every
window:

- TTFT misses: prompts wait too long; grow the budget and raise the cap (more requests
  admitted, more prefill per step, fewer steps per prompt, so more throughput). This wins
  over a TPOT miss: when both miss the server is overloaded, and fewer requests at once or
  a smaller budget would only deepen the backlog.
- TPOT misses while TTFT has slack (its percentile, and the longest wait of a request still
  without its first token, under `slack_share` of the target): the cap's job (below).
- TPOT misses and TTFT has no slack to spend: shrink the budget (less prefill rides along
  with each decode step: Sarathi's lever, for a device where batching decodes is cheap);
- both hold: keep both.

The cap (`RunningCap`) follows two signals that lead the finished requests by a whole
request lifetime: the mean time of the engine's decode-only steps, which is the TPOT every
running request is getting now from the requests decoding beside it (a step that also
prefills is long whatever the cap), and the wait of the oldest queued request. Steps longer than the
TPOT target lower it below the most requests that ran at once; a wait past the TTFT slack
raises it. Queued requests then wait, spending TTFT's slack, while the running ones get
shorter steps. This is the lever that works where a step's time grows with the number of
requests in it (a CPU: every request's decode is compute). The budget alone does not limit
how many requests decode together, and splitting prefill into more chunks conserves its
work, so a smaller budget does not lower a request's mean TPOT there. The cap never starves
the engine: it is at least 1, and the scheduler admits while fewer requests run than the
cap, so a queued request is admitted whenever nothing runs. Lowering it preempts nothing:
running requests finish, and admission waits.

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

A budget move that made things worse is taken back. The rules above assume that a smaller
budget shortens the decoding requests' steps and a larger one drains a backlog faster; where
a step's fixed cost dominates (a small model on a CPU), a smaller budget can instead add
steps and make both latencies worse (in one run at 3.5 req/s on the bundled model fixed 256
met the SLO for 17% of requests and 2048 for 55%). So the share of requests meeting every
target after a move (again only requests that decoded under it) is compared with the share
before: if it fell by more than `revert_margin`, the budget (and the cap, which a growing
move raises too) before come back and that kind of move is not tried again for
`hold_windows` windows. The cap judges its own lowerings by the step time (`RunningCap`).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fitserve.bench.metrics import Slo, time_per_output_token
from fitserve.engine.request import Request


@dataclass
class RunningCap:
    """The cap on requests running at once, moved every window by two signals that lead the
    finished requests: how long the engine's decode-only steps took (every running request
    decodes one token per step, so their mean time is the TPOT that decoding together costs
    them; steps that also prefill are not timed, as a cap on running requests does not shorten
    a prompt's prefill: at 2.75 req/s of 512-token prompts, where most of a step's work is
    prefill, the two runs in six whose cap was lowered early by the mean of all steps lost a
    quarter to a half of their goodput) and how long the oldest queued request has waited for
    its first token.

    - The wait is past `slack_share` of the TTFT target: the queue is spending TTFT it does
      not have; raise the cap. This is checked every `wait_check_s`, not once a window: in a
      2 s window a request that waited 0.9 s can reach 2.9 s (measured: a request missed a
      2 s TTFT target by 70 ms while the cap held others back).
    - Else steps are longer than `tpot_share` of the TPOT target (a request's TPOT is a
      mean over windows of different step times, so the loop aims under the target for
      the percentile to meet it), and so is the SLO's percentile of the running requests'
      TPOT so far (they are on course to miss; a burst of long steps that their mean
      absorbs is no reason to hold requests back, which costs TTFT and, at the end of a
      run, throughput: measured, a cap moved by step time alone made 1.6% less goodput
      than fixed budgets where every setting met the SLO): lower the cap below the most
      requests that ran at once in the window, so that queued requests wait while the
      running ones get shorter steps. Never below the requests the load needs (`needed`):
      N requests each at the TPOT target make N / TPOT tokens a second, so fewer than
      arrival rate x output tokens x TPOT target cannot keep up, and the queue would grow
      without bound (measured: lowered to 8 early in a run that needed about 20, the cap
      built a backlog that cost 13% of the requests their SLO). Not before the engine has
      finished a few requests: until then the steps are the first prompts' prefill, which
      says nothing about how long decoding
      steps are under the load (lowered then, the cap held 5 requests while a backlog
      built, and the loop spent the run raising it again).
    - Else a request waits and the steps have room for more (shorter than the target by
      the step factor): raise the cap, so that a cap lowered for a burst does not outlive it.

    A lowering that does not shorten the steps (a device where batching decodes is nearly
    free) is taken back at the next window and not tried for `hold_windows` windows. A raise
    forced by the wait also holds lowerings for `hold_windows` windows: the cap was below what
    the load needs, and lowering again at the next window of long steps only rebuilds the
    backlog (measured near capacity, 3 req/s on the bundled model: the cap swung 31, 39, 31,
    39, 49 window after window while every window missed the SLO, and made 1.1-1.4 req/s of
    goodput where a fixed budget with no cap made 2.5-2.9).
    """

    ceiling: int
    """The engine's `max_num_seqs`; the cap starts there (no cap)."""
    floor: int = 1
    """At least 1, so a queued request is admitted when nothing runs."""
    window_s: float = 2.0
    """Step times are averaged over this long before the cap may move for them."""
    step_factor: float = 1.25
    """A move multiplies or divides the cap by this."""
    slack_share: float = 0.5
    """Queued requests may wait this share of the TTFT target (the rest is left for their
    prefill and for noise) before the cap is raised."""
    tpot_share: float = 0.9
    """Steps, and the running requests' TPOT so far, are held under this share of the TPOT
    target, so that the percentile of whole requests' TPOT meets it."""
    wait_check_s: float = 0.25
    """How often the oldest queued request's wait is compared with the TTFT slack."""
    min_steps: int = 5
    """Steps a window needs before the step time may lower the cap."""
    min_gain: float = 0.05
    """A lowering must shorten the mean step time by this share, or it is taken back."""
    hold_windows: int = 5
    value: int = field(init=False)
    """The cap now (what the scheduler uses as its `max_num_seqs`)."""
    _window_start: float | None = None
    _last_step: tuple[float, int] | None = None
    """(time, requests running) of the latest step."""
    _step_time: float = 0.0
    _num_steps: int = 0
    _peak_running: int = 0
    _last_lowering: tuple[int, float] | None = None
    """(cap before, mean step time before) of the latest lowering, until it is judged."""
    _held_windows: int = 0
    _last_wait_check: float = float("-inf")
    _raised: bool = False
    """The wait raised the cap during the current window (which then lowers nothing)."""

    def __post_init__(self) -> None:
        if self.floor < 1:
            raise ValueError(f"min_running must be >= 1 (got {self.floor}): a cap of 0 admits nothing")
        if self.ceiling < self.floor:
            raise ValueError(f"max_num_seqs ({self.ceiling}) is below min_running ({self.floor})")
        self.value = self.ceiling

    def raise_(self) -> None:
        """Allow 1.25x as many requests at once (at least one more), up to the ceiling."""
        self.value = min(self.ceiling, int(self.value * self.step_factor) + 1)

    def step(self, now: float, num_running: int, tpot_target_ms: float | None, ttft_target_ms: float | None,
             oldest_wait_ms: Callable[[], float], may_lower: bool = True,
             live_tpot_ms: Callable[[], float | None] | None = None, needed: Callable[[], int] | None = None,
             previous_step_decode_only: bool = True) -> None:
        """Called at every step with the requests running as it starts; `may_lower`: enough
        requests have finished for the step times to describe the load; `live_tpot_ms`: the
        SLO's percentile of the running requests' TPOT so far (None: none has two tokens yet;
        no callable: not known, the step time alone decides); `needed`: the fewest running
        requests that keep up with the load at the TPOT target (no callable: 0);
        `previous_step_decode_only`: the step that just ended had no prompt tokens (only such
        steps are timed: the cap limits how many requests decode at once, and a step that also
        prefills is long whatever the cap)."""
        if self._last_step is not None and self._last_step[1] > 0 and previous_step_decode_only:
            self._step_time += now - self._last_step[0]
            self._num_steps += 1
        self._last_step = (now, num_running)
        self._peak_running = max(self._peak_running, num_running)
        if ttft_target_ms is None or tpot_target_ms is None:
            return  # without both targets there is no slack to trade for shorter steps
        if now - self._last_wait_check >= self.wait_check_s:
            self._last_wait_check = now
            # Only while the cap is what holds requests back: otherwise raising it admits no one.
            if num_running >= self.value and oldest_wait_ms() > self.slack_share * ttft_target_ms:
                self.raise_()
                self._raised, self._last_lowering = True, None  # a raise confounds judging a lowering
                # hold_windows whole windows after this one (the window's end counts one down)
                self._held_windows = self.hold_windows + 1
        if self._window_start is None:
            self._window_start = now
        if now - self._window_start < self.window_s:
            return
        step_ms = self._step_time / self._num_steps * 1e3 if self._num_steps >= self.min_steps else None
        peak_running, raised = self._peak_running, self._raised
        self._window_start, self._step_time, self._num_steps, self._peak_running = now, 0.0, 0, 0
        self._raised = False
        self._held_windows = max(0, self._held_windows - 1)
        if self._last_lowering is not None and step_ms is not None:
            cap_before, step_ms_before = self._last_lowering
            self._last_lowering = None
            if step_ms > step_ms_before * (1 - self.min_gain):
                self.value, self._held_windows = cap_before, self.hold_windows
                return
        if raised:
            return
        wait_ms = oldest_wait_ms()
        if wait_ms > self.slack_share * ttft_target_ms:
            if peak_running >= self.value:
                self.raise_()
                self._held_windows = self.hold_windows
        elif (step_ms is not None and step_ms > self.tpot_share * tpot_target_ms and may_lower
              and not self._held_windows and self._on_course_to_miss(live_tpot_ms, tpot_target_ms)):
            running = min(self.value, peak_running)
            lowest = max(self.floor, needed() if needed is not None else 0)
            if running > lowest:
                self._last_lowering = (self.value, step_ms)
                self.value = max(lowest, min(running - 1, int(running / self.step_factor)))
        elif (wait_ms > 0 and peak_running >= self.value and step_ms is not None
              and step_ms * self.step_factor < tpot_target_ms):
            self.raise_()

    def _on_course_to_miss(self, live_tpot_ms: Callable[[], float | None] | None, tpot_target_ms: float) -> bool:
        if live_tpot_ms is None:
            return True
        live = live_tpot_ms()
        return live is not None and live > self.tpot_share * tpot_target_ms


GROW, SMALLER = "grow", "smaller"
"""The budget loop's moves: grow the budget (and raise the cap); shrink the budget."""


@dataclass
class SloBudgetController:
    slo: Slo
    budget: int
    """The current step token budget (what the scheduler uses)."""
    min_budget: int
    max_budget: int
    max_num_seqs: int = 128
    """The cap's ceiling: the engine's `max_num_seqs`; the cap starts there (no cap)."""
    min_running: int = 1
    """The cap's floor; at least 1, so a queued request is admitted when nothing runs."""
    slack_share: float = 0.5
    """TTFT has slack to spend on a lower cap while its percentile and the longest current
    wait for a first token are under this share of the target."""
    window_s: float = 2.0
    step_factor: float = 1.25
    min_requests: int = 4
    """Finished requests a window needs before it may move the budget."""
    revert_margin: float = 0.1
    """How far attainment may fall after a move before the move is taken back."""
    hold_windows: int = 10
    """Windows during which a kind of move that was taken back is not tried again."""
    attainment: float | None = None
    """Share of the latest window's requests that met every target (None before one)."""
    num_met_total: int = 0
    num_finished_total: int = 0
    num_output_tokens_total: int = 0
    demand_horizon_s: float = 10.0
    """Arrivals over this long give the arrival rate that sets the cap's lower bound."""
    _arrivals: deque[float] = field(default_factory=deque)
    _window: list[tuple[float, float | None, float]] = field(default_factory=list)  # (ttft, tpot, first token)
    _window_start: float | None = None
    cap: RunningCap = field(init=False)
    """The cap on requests running at once, moved by its own leading signals."""
    _moved_at: float = float("-inf")
    """When a knob last moved: requests with an earlier first token do not judge it."""
    _current_attainment: float | None = None
    """Attainment of the latest judged requests that decoded under the current setting."""
    _last_move: tuple[str, int, int, float] | None = None
    """(move, budget before, cap before, attainment before) of a move not yet judged, to take
    back if it hurt."""
    _held: dict[str, int] = field(default_factory=dict)
    """Move -> windows it stays untried after such a move was taken back."""

    def __post_init__(self) -> None:
        self.cap = RunningCap(self.max_num_seqs, self.min_running, self.window_s, self.step_factor,
                              self.slack_share, hold_windows=self.hold_windows)

    @property
    def max_running(self) -> int:
        """The cap on requests running at once (the scheduler's `max_num_seqs`)."""
        return self.cap.value

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
        self.num_output_tokens_total += request.num_output_tokens

    def observe_arrival(self, arrival_time: float) -> None:
        """A request arrived: the arrival rate sets how few requests may run at once."""
        self._arrivals.append(arrival_time)

    def _needed_running(self, now: float) -> int:
        """The fewest requests that, each at the TPOT target, make the tokens the recent
        arrivals ask for: arrival rate x mean output tokens x TPOT target."""
        while self._arrivals and self._arrivals[0] < now - self.demand_horizon_s:
            self._arrivals.popleft()
        if not self._arrivals or not self.num_finished_total or self.slo.tpot_ms is None:
            return 0
        rate = len(self._arrivals) / max(self.window_s, min(self.demand_horizon_s, now - self._arrivals[0]))
        mean_output = self.num_output_tokens_total / self.num_finished_total
        return math.ceil(rate * mean_output * self.slo.tpot_ms / 1e3)

    def _meets(self, ttft: float, tpot: float | None) -> bool:
        if self.slo.ttft_ms is not None and ttft * 1e3 > self.slo.ttft_ms:
            return False
        return not (self.slo.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.slo.tpot_ms)

    def update(self, now: float, oldest_waiting_arrival: Callable[[], float | None] | None = None,
               num_running: int = 0, running_tpots_ms: Callable[[], list[float]] | None = None,
               previous_step_decode_only: bool = True) -> int:
        """Called every step: close the window if it is over and move the knobs; returns the
        budget to use (the cap to use is `max_running`). `oldest_waiting_arrival` gives the
        arrival time of the longest-waiting request that has no first token yet (None: none
        waits); it is asked every `RunningCap.wait_check_s` and when a window closes, not at
        every step. `num_running`: requests running now;
        `running_tpots_ms`: each running request's TPOT so far (asked at most once a window);
        `previous_step_decode_only`: the step before had no prompt tokens (see RunningCap.step)."""
        waits: list[float] = []

        def oldest_wait_ms() -> float:
            """How long the oldest request without a first token has waited (asked once)."""
            if not waits:
                waiting_since = oldest_waiting_arrival() if oldest_waiting_arrival is not None else None
                waits.append((now - waiting_since) * 1e3 if waiting_since is not None else 0.0)
            return waits[0]

        self.cap.step(now, num_running, self.slo.tpot_ms, self.slo.ttft_ms, oldest_wait_ms,
                      may_lower=self.num_finished_total >= self.min_requests,
                      live_tpot_ms=None if running_tpots_ms is None else lambda: self._live_tpot_ms(running_tpots_ms),
                      needed=lambda: self._needed_running(now), previous_step_decode_only=previous_step_decode_only)
        if self._window_start is None:
            self._window_start = now
        if now - self._window_start < self.window_s:
            return self.budget
        longest_wait_ms = oldest_wait_ms()
        backlog = self.slo.ttft_ms is not None and longest_wait_ms > self.slo.ttft_ms
        if len(self._window) >= self.min_requests:
            self.attainment = sum(self._meets(t, p) for t, p, _ in self._window) / len(self._window)
        # Only requests that decoded under the current setting judge it.
        current = [(ttft, tpot) for ttft, tpot, first_token in self._window if first_token >= self._moved_at]
        judged = len(current) >= self.min_requests
        if not (judged or backlog):
            if len(self._window) >= self.min_requests:
                self._close_window(now)
            return self.budget  # too few requests to judge the setting by, and no request late yet
        ttft_misses, tpot_misses, ttft_slack = backlog, False, False
        if judged:
            ttfts = [ttft * 1e3 for ttft, _ in current]
            tpots = [tpot * 1e3 for _, tpot in current if tpot is not None]
            percentile = self.slo.percentile
            ttft_ms = float(np.percentile(ttfts, percentile))
            ttft_misses |= self.slo.ttft_ms is not None and ttft_ms > self.slo.ttft_ms
            tpot_misses = (self.slo.tpot_ms is not None and bool(tpots)
                           and float(np.percentile(tpots, percentile)) > self.slo.tpot_ms)
            ttft_slack = (self.slo.ttft_ms is not None and ttft_ms <= self.slack_share * self.slo.ttft_ms
                          and longest_wait_ms <= self.slack_share * self.slo.ttft_ms)
        self._close_window(now)
        self._held = {move: left - 1 for move, left in self._held.items() if left > 1}
        if judged:
            self._current_attainment = sum(self._meets(t, p) for t, p in current) / len(current)
            if self._take_back_a_harmful_move(now):
                return self.budget
        if ttft_misses:
            self._try_move(GROW, now)
        elif tpot_misses and not ttft_slack:
            self._try_move(SMALLER, now)  # with slack, the cap answers TPOT (see RunningCap)
        return self.budget

    def _live_tpot_ms(self, running_tpots_ms: Callable[[], list[float]]) -> float | None:
        tpots = running_tpots_ms()
        return float(np.percentile(tpots, self.slo.percentile)) if tpots else None

    def _close_window(self, now: float) -> None:
        self._window, self._window_start = [], now

    def _take_back_a_harmful_move(self, now: float) -> bool:
        """Judge the latest move by the requests that decoded under it; restore the setting
        before it if attainment fell by more than the margin (True: taken back)."""
        if self._last_move is None:
            return False
        move, budget_before, cap_before, attainment_before = self._last_move
        self._last_move = None
        assert self._current_attainment is not None
        if self._current_attainment >= attainment_before - self.revert_margin:
            return False
        self._held[move] = self.hold_windows
        self.budget, self.cap.value, self._moved_at = budget_before, cap_before, now
        self._current_attainment = attainment_before
        return True

    def _try_move(self, move: str, now: float) -> None:
        """Make `move` unless it is held or changes nothing."""
        if move in self._held:
            return
        budget_before, cap_before = self.budget, self.cap.value
        if move == GROW:
            self.budget = min(self.max_budget, int(self.budget * self.step_factor) + 1)
            self.cap.raise_()
        else:
            self.budget = max(self.min_budget, int(self.budget / self.step_factor))
        if (self.budget, self.cap.value) != (budget_before, cap_before):
            self._moved_at = now
            self._last_move = ((move, budget_before, cap_before, self._current_attainment)
                               if self._current_attainment is not None else None)
            self._current_attainment = None

"""`--slo`: the engine follows latency targets with two knobs, the number of requests allowed
to run at once (a cap under `max_num_seqs`) and the step's token budget; the order of the
queue (`LateLastPolicy`, which the engine wraps around the chosen policy) does the rest.

Goodput counts the requests that meet every target, so under overload the aim is to serve as
many requests as the machine can within the targets, not all of them late:

- The cap (`RunningCap`) holds TPOT. Every running request decodes one token per step, so
  the mean step time is the TPOT they are all heading for; it is read at every step, and
  the cap drops below the running requests while steps are too long, and rises while they
  have room and a request that can still meet its TTFT waits. This is the lever where a
  step's time grows with the requests in it (a CPU: every request's decode is compute); the
  budget alone does not limit how many requests decode together, and splitting a prompt
  into more chunks conserves its work, so a smaller budget does not lower a request's mean
  TPOT there. Measured on the bundled model at 4 req/s with `ttft=1s,tpot=50ms`: fixed
  budgets with no cap let every arrival in, p90 TPOT went to 85-215 ms and 24-67% of
  requests met the SLO.
- Late requests wait last (`LateLastPolicy`): with the cap holding requests back, a queue
  forms, and served first come first served every request in it would miss TTFT. A request
  past its TTFT target has missed the SLO whatever happens next, so requests that can still
  meet it go first; late ones still run, when nothing on time waits.
- The budget follows the finished requests, as semi-PD moves compute between prefill and
  decode every window: every `window_s` the engine's own timings of the requests that
  finished in it (TTFT from arrival to first token, TPOT over the rest, the formulas of
  bench/metrics.py) are compared at the SLO's percentile with the targets. TTFT misses, or
  late requests wait: grow the budget (more prefill per step, fewer steps per prompt; this
  wins when both miss, as a smaller budget would only deepen a backlog). TPOT misses while
  TTFT has no slack (its percentile, and the wait of the next on-time request to be
  admitted, over `slack_share` of the target): shrink it (less prefill rides along with each
  decode step: Sarathi's lever, for a device where batching decodes is cheap). With slack,
  TPOT is the cap's to answer.

The budget moves by a factor (multiplicative increase and decrease) between a floor and a
ceiling. A window with too few finished requests changes nothing.

A budget move is judged only by requests that decoded under it. A request's lifetime (its
TTFT plus every output token) is usually longer than a window, so the requests that finish
in the window after a move were served mostly under the budget before it: judged by them,
the loop moves again for a miss it has already answered, and overshoots. After a move,
finished requests whose first token came before it still count for attainment, but only
those whose first token came after it (and the backlog signal) may move the budget again.

A budget move that made things worse is taken back. The rules above assume that a smaller
budget shortens the decoding requests' steps and a larger one drains a backlog faster; where
a step's fixed cost dominates (a small model on a CPU), a smaller budget can instead add
steps and make both latencies worse. So the share of requests meeting every target after a
move (again only requests that decoded under it) is compared with the share before: if it
fell by more than `revert_margin`, the budget before comes back and that kind of move is not
tried again for `hold_windows` windows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from fitserve.bench.metrics import Slo, time_per_output_token
from fitserve.engine.request import Request


@dataclass
class RunningCap:
    """The cap on requests running at once, moved at every step by the step time: the TPOT
    that every running request is getting now.

    Each running request decodes one token per step, so a request's TPOT is the mean time of
    the steps it ran through, prompt-carrying steps included; an exponential mean of every
    step's time (`smoothing` per step, about a second of steps) is what the running requests'
    TPOT is heading to. It reacts within a second, where whole requests finishing report a
    change a request lifetime late, and a 2 s window with 1.25x moves was measured to settle
    too slowly to help in a 30 s overload.

    - The mean is past `tpot_share` of the TPOT target (a request's TPOT is a mean over steps
      of different lengths, so the cap aims under the target for the percentile to meet it),
      and so is the SLO's percentile of the running requests' TPOT so far (they are on
      course to miss): the cap drops to one below the requests running, so the next request
      to finish is not replaced. It can go no further until one finishes, which paces it by
      the requests' own lifetimes instead of the clock: the running requests' steps shorten
      as they leave, and the mean follows. The second condition keeps a burst of prompts,
      which a request's mean over its whole output absorbs, from holding anyone back:
      measured at 2 req/s on the bundled model, where every fixed budget met the SLO, the
      step time alone sent the cap to 1 four times in a run and cost 3% of the requests
      their TTFT. It also keeps the first prompts' prefill, before any request has two
      tokens, from lowering the cap at the start of a run.
    - Else, when a request that can still meet its TTFT waits while the cap binds, and the
      mean leaves room for one more request (a step's time taken as growing in proportion
      to the requests in it), one more is allowed, at most once every `raise_every_steps`
      steps, so that the mean has seen the newcomer's prompt before the next raise. Raising
      to all the room at once (up to 1.5x a time) was measured worse at 4 req/s on the
      bundled model (2.47 and 2.24 req/s of goodput against 3.21-3.55 one at a time, p90
      TPOT 46 against 40 ms): several prompts admitted together make one long step for
      every running request.

    Requests waiting past their TTFT target do not raise the cap (`LateLastPolicy` keeps them
    behind the rest): they have missed the SLO already, and admitting them would stretch the
    steps of requests that have not. This is the lever that works where a step's time grows
    with the requests in it (a CPU: every request's decode is compute); where batching is
    nearly free the mean stays under the target and the cap never binds. The cap never
    starves the engine: it is at least `floor`, and the scheduler admits while fewer
    requests run than the cap. Lowering it preempts nothing: running requests finish, and
    admission waits.
    """

    ceiling: int
    """The engine's `max_num_seqs`; the cap starts there (no cap)."""
    floor: int = 1
    """At least 1, so a queued request is admitted when nothing runs."""
    tpot_share: float = 0.9
    """The mean step time is held under this share of the TPOT target."""
    smoothing: float = 1 / 16
    """Weight of each step in the exponential mean of step times."""
    raise_every_steps: int = 8
    """Steps between two raises."""
    value: int = field(init=False)
    """The cap now (what the scheduler uses as its `max_num_seqs`)."""
    step_ms: float | None = None
    """The exponential mean of step times (None before the first step with requests)."""
    _last_step: tuple[float, int] | None = None
    """(time, requests running) as the latest step started."""
    _steps_since_raise: int = 0

    def __post_init__(self) -> None:
        if self.floor < 1:
            raise ValueError(f"min_running must be >= 1 (got {self.floor}): a cap of 0 admits nothing")
        if self.ceiling < self.floor:
            raise ValueError(f"max_num_seqs ({self.ceiling}) is below min_running ({self.floor})")
        self.value = self.ceiling

    def step(self, now: float, num_running: int, tpot_target_ms: float | None,
             on_time_request_waits: Callable[[], bool],
             running_tpot_ms: Callable[[], float | None] | None = None) -> None:
        """Called as each step starts, with the requests running then; `on_time_request_waits`:
        a request that can still meet its TTFT target waits for admission (asked only when a
        raise is possible); `running_tpot_ms`: the SLO's percentile of the running requests'
        TPOT so far, None while none has two tokens (asked only when the steps are long; no
        callable: the step time alone decides)."""
        if self._last_step is not None and self._last_step[1] > 0:
            elapsed_ms = (now - self._last_step[0]) * 1e3
            self.step_ms = (elapsed_ms if self.step_ms is None
                            else self.step_ms + self.smoothing * (elapsed_ms - self.step_ms))
        self._last_step = (now, num_running)
        self._steps_since_raise += 1
        if tpot_target_ms is None or self.step_ms is None:
            return
        aim_ms = self.tpot_share * tpot_target_ms
        if self.step_ms > aim_ms:
            if running_tpot_ms is None or (live_ms := running_tpot_ms()) is not None and live_ms > aim_ms:
                self.value = max(self.floor, min(self.value, num_running - 1))
        elif (self.value < self.ceiling and num_running >= self.value
              and self._steps_since_raise >= self.raise_every_steps
              # one more request, taking a step's time as growing in proportion to its
              # requests (it grows less: part of a step is fixed cost)
              and self.step_ms * (self.value + 1) / max(1, num_running) <= aim_ms and on_time_request_waits()):
            self.value += 1
            self._steps_since_raise = 0


GROW, SMALLER = "grow", "smaller"
"""The budget loop's moves: grow the budget; shrink the budget."""


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
    """TTFT has slack (TPOT misses are then the cap's to answer) while its percentile and the
    longest current wait for a first token are under this share of the target."""
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
    _window: list[tuple[float, float | None, float, bool]] = field(default_factory=list)
    """(TTFT, TPOT, first token time, met every target) of the window's finished requests."""
    _window_start: float | None = None
    cap: RunningCap = field(init=False)
    """The cap on requests running at once, moved at every step by the step time."""
    _moved_at: float = float("-inf")
    """When the budget last moved: requests with an earlier first token do not judge it."""
    _current_attainment: float | None = None
    """Attainment of the latest judged requests that decoded under the current budget."""
    _last_move: tuple[str, int, float] | None = None
    """(move, budget before, attainment before) of a move not yet judged, to take back if it
    hurt."""
    _held: dict[str, int] = field(default_factory=dict)
    """Move -> windows it stays untried after such a move was taken back."""

    def __post_init__(self) -> None:
        self.cap = RunningCap(self.max_num_seqs, self.min_running)

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
        met = self._meets(ttft, tpot)
        self._window.append((ttft, tpot, metrics.first_token_time, met))
        self.num_met_total += met
        self.num_finished_total += 1

    def _meets(self, ttft: float, tpot: float | None) -> bool:
        if self.slo.ttft_ms is not None and ttft * 1e3 > self.slo.ttft_ms:
            return False
        return not (self.slo.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.slo.tpot_ms)

    def update(self, now: float, on_time_head_arrival: Callable[[], float | None] | None = None,
               num_running: int = 0, late_requests_wait: bool = False,
               running_tpots_ms: Callable[[], list[float]] | None = None) -> int:
        """Called as every step starts: move the cap, close the window if it is over and move
        the budget; returns the budget to use (the cap to use is `max_running`).
        `on_time_head_arrival` gives the arrival time of the next request to be admitted
        among those that can still meet their TTFT target (the engine's: the head of the
        queue, under fcfs the longest-waiting; None: none waits); `num_running`: requests running;
        `late_requests_wait`: requests past the TTFT target wait for admission (a backlog);
        `running_tpots_ms`: each running request's TPOT so far (asked only when steps are long)."""
        waits: list[float] = []

        def head_wait_ms() -> float:
            """How long that on-time request has waited (asked once; -1 when none waits)."""
            if not waits:
                waiting_since = on_time_head_arrival() if on_time_head_arrival is not None else None
                waits.append((now - waiting_since) * 1e3 if waiting_since is not None else -1.0)
            return waits[0]

        self.cap.step(now, num_running, self.slo.tpot_ms, lambda: head_wait_ms() >= 0,
                      None if running_tpots_ms is None else lambda: self._percentile_or_none(running_tpots_ms()))
        if self._window_start is None:
            self._window_start = now
        if now - self._window_start < self.window_s:
            return self.budget
        wait_ms = max(0.0, head_wait_ms())
        backlog = self.slo.ttft_ms is not None and (late_requests_wait or wait_ms > self.slo.ttft_ms)
        if len(self._window) >= self.min_requests:
            self.attainment = sum(met for *_, met in self._window) / len(self._window)
        # Only requests that decoded under the current budget judge it.
        current = [(ttft, tpot, met) for ttft, tpot, first_token, met in self._window if first_token >= self._moved_at]
        judged = len(current) >= self.min_requests
        if not (judged or backlog):
            if len(self._window) >= self.min_requests:
                self._close_window(now)
            return self.budget  # too few requests to judge the budget by, and no request late yet
        ttft_misses, tpot_misses, ttft_slack = backlog, False, False
        if judged:
            ttfts = [ttft * 1e3 for ttft, _, _ in current]
            tpots = [tpot * 1e3 for _, tpot, _ in current if tpot is not None]
            ttft_ms = float(np.percentile(ttfts, self.slo.percentile))
            ttft_misses |= self.slo.ttft_ms is not None and ttft_ms > self.slo.ttft_ms
            tpot_ms = self._percentile_or_none(tpots)
            tpot_misses = self.slo.tpot_ms is not None and tpot_ms is not None and tpot_ms > self.slo.tpot_ms
            ttft_slack = (self.slo.ttft_ms is not None and ttft_ms <= self.slack_share * self.slo.ttft_ms
                          and wait_ms <= self.slack_share * self.slo.ttft_ms)
        self._close_window(now)
        self._held = {move: left - 1 for move, left in self._held.items() if left > 1}
        if judged:
            self._current_attainment = sum(met for _, _, met in current) / len(current)
            if self._take_back_a_harmful_move(now):
                return self.budget
        if ttft_misses:
            self._try_move(GROW, now)
        elif tpot_misses and not ttft_slack:
            self._try_move(SMALLER, now)  # with slack, the cap answers TPOT (see RunningCap)
        return self.budget

    def _percentile_or_none(self, values: list[float]) -> float | None:
        return float(np.percentile(values, self.slo.percentile)) if values else None

    def _close_window(self, now: float) -> None:
        self._window, self._window_start = [], now

    def _take_back_a_harmful_move(self, now: float) -> bool:
        """Judge the latest move by the requests that decoded under it; restore the budget
        before it if attainment fell by more than the margin (True: taken back)."""
        if self._last_move is None:
            return False
        move, budget_before, attainment_before = self._last_move
        self._last_move = None
        assert self._current_attainment is not None
        if self._current_attainment >= attainment_before - self.revert_margin:
            return False
        self._held[move] = self.hold_windows
        self.budget, self._moved_at = budget_before, now
        self._current_attainment = attainment_before
        return True

    def _try_move(self, move: str, now: float) -> None:
        """Make `move` unless it is held or changes nothing."""
        if move in self._held:
            return
        budget_before = self.budget
        if move == GROW:
            self.budget = min(self.max_budget, int(self.budget * self.step_factor) + 1)
        else:
            self.budget = max(self.min_budget, int(self.budget / self.step_factor))
        if self.budget != budget_before:
            self._moved_at = now
            self._last_move = ((move, budget_before, self._current_attainment)
                               if self._current_attainment is not None else None)
            self._current_attainment = None

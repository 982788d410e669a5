"""Prometheus metrics for GET /metrics, kept in a per-app registry (no global state).

Two sources feed it:
- the HTTP layer observes each finished sequence (finish reason, TTFT, TPOT, end-to-end
  latency) as the client experiences it, queueing included, with bench/'s formulas;
- the engine's own counters (tokens, preemptions, running/waiting, KV usage) are read from
  the latest `EngineStats` snapshot at scrape time, so they can never drift from the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from fitserve.bench.metrics import time_per_output_token
from fitserve.engine.engine import EngineStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class _EngineStatsCollector(Collector):
    """Turns the engine's latest stats snapshot into metric families on every scrape."""

    def __init__(self, read_stats: Callable[[], EngineStats | None]) -> None:
        self._read_stats = read_stats

    def collect(self) -> Iterator[Metric]:
        stats = self._read_stats()
        if stats is None:
            return
        yield CounterMetricFamily("fitserve_prompt_tokens", "Prompt tokens processed.",
                                  value=stats.num_prompt_tokens_total)
        yield CounterMetricFamily("fitserve_generation_tokens", "Tokens generated.",
                                  value=stats.num_generated_tokens_total)
        yield CounterMetricFamily("fitserve_num_preemptions", "Requests preempted to free KV blocks.",
                                  value=stats.num_preemptions_total)
        yield CounterMetricFamily("fitserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache.",
                                  value=stats.num_prefix_cache_hit_tokens_total)
        yield GaugeMetricFamily("fitserve_num_requests_running", "Requests being computed.", value=stats.num_running)
        yield GaugeMetricFamily("fitserve_num_requests_waiting", "Requests queued for a slot.", value=stats.num_waiting)
        yield GaugeMetricFamily("fitserve_kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1).",
                                value=stats.kv_cache_usage)
        yield GaugeMetricFamily("fitserve_kv_cache_free_blocks", "KV-cache blocks free.", value=stats.num_free_blocks)
        yield GaugeMetricFamily("fitserve_kv_cache_total_blocks", "KV-cache blocks in all.",
                                value=stats.num_total_blocks)
        yield GaugeMetricFamily("fitserve_step_token_budget", "Token budget of one engine step (moved by --slo).",
                                value=stats.step_token_budget)
        yield GaugeMetricFamily("fitserve_running_requests_cap",
                                "Most requests allowed to run at once (--max-num-seqs; lowered by --slo).",
                                value=stats.running_requests_cap)
        if stats.slo_attainment is not None:
            yield GaugeMetricFamily("fitserve_slo_attainment_ratio",
                                    "Share of the latest --slo window's finished requests that met every target.",
                                    value=stats.slo_attainment)
        if stats.num_late_waiting is not None:
            yield GaugeMetricFamily("fitserve_num_requests_waiting_late",
                                    "Waiting requests past their --slo TTFT target, queued behind on-time ones.",
                                    value=stats.num_late_waiting)
        if stats.weight_memory_bytes is not None:
            yield GaugeMetricFamily("fitserve_weight_memory_bytes", "Bytes of all model weights in memory "
                                    "(BitStack models: changes with the budget).", value=stats.weight_memory_bytes)
            yield GaugeMetricFamily("fitserve_weight_memory_budget_bytes",
                                    "The weight-memory budget set (or being moved to).",
                                    value=stats.weight_memory_budget_bytes)
        yield CounterMetricFamily("fitserve_computed_tokens", "Tokens the model computed K/V for: prompts, decode "
                                  "and recomputation after preemption.", value=stats.num_computed_tokens_total)
        yield CounterMetricFamily("fitserve_recomputed_tokens", "Tokens computed again after a preemption dropped "
                                  "their K/V (what swap preemption saves).", value=stats.num_recomputed_tokens_total)
        yield CounterMetricFamily("fitserve_swap_outs", "Requests whose KV was swapped out to host memory.",
                                  value=stats.num_swap_outs_total)
        yield CounterMetricFamily("fitserve_swap_bytes", "Bytes of KV copied between device and host.",
                                  value=stats.num_swap_bytes_total)
        yield CounterMetricFamily("fitserve_host_prefix_cache_hit_tokens",
                                  "Prompt tokens copied in from the host tier of the prefix cache instead of computed.",
                                  value=stats.num_host_prefix_hit_tokens_total)


@dataclass
class SequenceTimer:
    """Wall-clock marks of one generated sequence, as the server sees it."""

    start_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    num_output_tokens: int = 0

    def saw_tokens(self, num_output_tokens: int) -> None:
        if num_output_tokens > 0 and self.first_token_time is None:
            self.first_token_time = time.monotonic()
        self.num_output_tokens = num_output_tokens


class ServerMetrics:
    """The app's registry and the instruments the HTTP layer updates."""

    def __init__(self, read_stats: Callable[[], EngineStats | None]) -> None:
        self.registry = CollectorRegistry()
        self.finished_requests = Counter(
            "fitserve_request_finished", "Finished sequences by finish reason (stop, length, abort, error).",
            ["finish_reason"], registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "fitserve_time_to_first_token_seconds", "Time from request arrival to its first generated token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.time_per_output_token = Histogram(
            "fitserve_time_per_output_token_seconds", "Mean time between generated tokens after the first.",
            buckets=_PER_TOKEN_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "fitserve_e2e_request_latency_seconds", "Time from request arrival to its last token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(_EngineStatsCollector(read_stats))

    def observe_finished(self, timer: SequenceTimer, finish_reason: str) -> None:
        """Record one sequence that ended (any reason, including client aborts and errors)."""
        now = time.monotonic()
        self.finished_requests.labels(finish_reason=finish_reason).inc()
        if finish_reason in ("abort", "error"):
            return  # latencies of cut-short sequences would skew the histograms
        e2e_s = now - timer.start_time
        self.e2e_latency.observe(e2e_s)
        if timer.first_token_time is not None:
            ttft_s = timer.first_token_time - timer.start_time
            self.time_to_first_token.observe(ttft_s)
            tpot_s = time_per_output_token(e2e_s, ttft_s, timer.num_output_tokens)
            if tpot_s is not None:
                self.time_per_output_token.observe(tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

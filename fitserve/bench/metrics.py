"""The metric formulas of BENCHMARKING.md, written once; the server's /metrics reuses them.

Every function takes plain numbers or `RequestResult`s, so the same code summarises a bench
run, a server's own timings, or a JSON report loaded back from disk.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from fitserve.bench.records import RequestResult

PERCENTILES = (50, 90, 99)

METRIC_DEFINITIONS = {
    "TTFT": "first streamed token received − request sent",
    "TPOT": "(E2E − TTFT) / (output tokens − 1), per request (requests with one token excluded)",
    "ITL": "every gap between consecutive streamed chunks carrying text, pooled over requests",
    "E2E": "last token received − request sent",
    "output throughput": "output tokens of completed requests / wall time of the run",
    "request throughput": "completed requests / wall time of the run",
    "goodput": "completed requests per second that meet every given SLO (TTFT, TPOT, E2E)",
    "energy per token": "joules over the run's window, idle baseline subtracted / output tokens",
}


def time_per_output_token(e2e_s: float, ttft_s: float, output_tokens: int) -> float | None:
    """TPOT of one request; undefined (None) with fewer than two output tokens."""
    if output_tokens < 2:
        return None
    return (e2e_s - ttft_s) / (output_tokens - 1)


def inter_token_latencies(chunk_times_s: Sequence[float]) -> list[float]:
    """Gaps between consecutive chunks of one stream."""
    return [later - earlier for earlier, later in zip(chunk_times_s, chunk_times_s[1:])]


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear-interpolated percentile (numpy's default, as vLLM reports it)."""
    return float(np.percentile(np.asarray(values, dtype=float), pct))


def describe(values: Iterable[float], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, median, p90, p99, min, max of `values` × scale; None fields when empty.

    Empty stays None rather than 0 so a report never claims a latency nobody measured.
    """
    array = np.asarray([value * scale for value in values], dtype=float)
    if array.size == 0:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None,
                "min": None, "max": None}
    return {
        "count": int(array.size),
        "mean": float(array.mean()),
        "median": float(np.percentile(array, 50)),
        "p90": float(np.percentile(array, 90)),
        "p99": float(np.percentile(array, 99)),
        "min": float(array.min()),
        "max": float(array.max()),
    }


@dataclass(frozen=True)
class Slo:
    """Latency limits; a None limit is not checked. Percentile applies to the rate search."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    percentile: float = 99.0

    def is_empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2e_ms is None

    def met_by(self, result: RequestResult) -> bool:
        """Whether one completed request meets every limit (a failed request never does).

        TPOT is undefined for a one-token answer, so that limit cannot be missed by it.
        """
        if not result.success or result.ttft_s is None or result.e2e_s is None:
            return False
        if self.ttft_ms is not None and result.ttft_s * 1e3 > self.ttft_ms:
            return False
        if self.e2e_ms is not None and result.e2e_s * 1e3 > self.e2e_ms:
            return False
        tpot = time_per_output_token(result.e2e_s, result.ttft_s, result.output_tokens)
        if self.tpot_ms is not None and tpot is not None and tpot * 1e3 > self.tpot_ms:
            return False
        return True

    def met_at_percentile(self, summary: dict) -> bool:
        """Whether the run's percentile latencies are within the limits (used by the rate search).

        Failed requests count against the SLO: a run where any request failed does not pass,
        otherwise a server that drops requests under load would look fast.
        """
        if summary["failed"] > 0 or summary["completed"] == 0:
            return False
        for limit, key in ((self.ttft_ms, "ttft_ms"), (self.tpot_ms, "tpot_ms"), (self.e2e_ms, "e2e_ms")):
            if limit is None:
                continue
            value = summary.get("percentile_at_slo", {}).get(key)
            if value is not None and value > limit:
                return False
        return True

    def to_dict(self) -> dict:
        return {"ttft_ms": self.ttft_ms, "tpot_ms": self.tpot_ms, "e2e_ms": self.e2e_ms,
                "percentile": self.percentile}


def mean_concurrent_decodes(results: Sequence[RequestResult]) -> float | None:
    """Time-averaged number of requests between their first and last token, over the time
    when at least one was; the batch size a decode step saw on average (for the roofline)."""
    events: list[tuple[float, int]] = []
    for result in results:
        if result.ttft_s is None or result.e2e_s is None or result.e2e_s <= result.ttft_s:
            continue
        events.append((result.sent_s + result.ttft_s, +1))
        events.append((result.sent_s + result.e2e_s, -1))
    if not events:
        return None
    events.sort()
    active, busy_time, weighted_time = 0, 0.0, 0.0
    previous_time = events[0][0]
    for time_s, change in events:
        if active > 0:
            busy_time += time_s - previous_time
            weighted_time += active * (time_s - previous_time)
        active += change
        previous_time = time_s
    return weighted_time / busy_time if busy_time > 0 else None


def summarize(results: Sequence[RequestResult], duration_s: float, slo: Slo | None = None) -> dict:
    """All run-level numbers of BENCHMARKING.md for one run.

    `duration_s` is the run's wall time: from the start of the load until the last response
    ended; throughputs divide by it.
    """
    completed = [result for result in results if result.success]
    failed = [result for result in results if not result.success]
    ttfts = [r.ttft_s for r in completed if r.ttft_s is not None]
    e2es = [r.e2e_s for r in completed if r.e2e_s is not None]
    tpots = [
        tpot for r in completed if r.ttft_s is not None and r.e2e_s is not None
        for tpot in [time_per_output_token(r.e2e_s, r.ttft_s, r.output_tokens)] if tpot is not None
    ]
    itls = [gap for r in completed for gap in inter_token_latencies(r.chunk_times_s)]
    output_tokens = sum(r.output_tokens for r in completed)
    input_tokens = sum(r.input_tokens for r in completed)
    safe_duration = duration_s if duration_s > 0 else math.nan
    summary: dict = {
        "num_requests": len(results),
        "completed": len(completed),
        "failed": len(failed),
        "failure_reasons": dict(Counter(_reason_class(r.error) for r in failed)),
        "duration_s": duration_s,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(completed) / safe_duration,
        "output_throughput": output_tokens / safe_duration,
        "total_token_throughput": (input_tokens + output_tokens) / safe_duration,
        "ttft_ms": describe(ttfts, 1e3),
        "tpot_ms": describe(tpots, 1e3),
        "itl_ms": describe(itls, 1e3),
        "e2e_ms": describe(e2es, 1e3),
        "mean_concurrent_decodes": mean_concurrent_decodes(completed),
        "mean_input_tokens": input_tokens / len(completed) if completed else None,
        "mean_output_tokens": output_tokens / len(completed) if completed else None,
        "goodput": None,
        "slo_attainment": None,
    }
    if slo is not None and not slo.is_empty():
        meeting = sum(1 for r in completed if slo.met_by(r))
        summary["goodput"] = meeting / safe_duration
        summary["slo_attainment"] = meeting / len(results) if results else None
        summary["percentile_at_slo"] = {
            key: (percentile(values, slo.percentile) * 1e3 if values else None)
            for key, values in (("ttft_ms", ttfts), ("tpot_ms", tpots), ("e2e_ms", e2es))
        }
        summary["meets_slo_at_percentile"] = slo.met_at_percentile(summary)
    return summary


def _reason_class(error: str | None) -> str:
    """Group failure messages by their kind ("HTTP 503", "timeout") so the table stays short."""
    if not error:
        return "unknown"
    return error.split(":", 1)[0].strip()

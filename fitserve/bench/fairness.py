"""How evenly a server shared itself between clients (multi-tenant workloads), from the
client side only: per-client latency, service received over time, Jain's fairness index,
and the largest service gap between clients that were both waiting.

Service is counted as VTC counts it (Sheng et al., OSDI'24): 1 per prompt token, credited
when the request's first token arrives, plus 2 per generated token, credited as the chunks
arrive. A client is *backlogged* while it has a request sent whose first token has not come
back (waiting in the server's queue or in prefill); it is *active* while it has any request
in flight. Works on the stored request rows of a report, so every number can be recomputed
from bench.json.
"""

from __future__ import annotations

from itertools import combinations
from typing import Sequence

import numpy as np

from fitserve.bench.metrics import describe, time_per_output_token

PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0
TIMELINE_POINTS = 1000

FAIRNESS_DEFINITIONS = {
    "service": f"{PROMPT_WEIGHT:g} per prompt token (at the first token) + {OUTPUT_WEIGHT:g} per generated token "
               "(as it arrives), the VTC paper's weights",
    "backlogged": "the client has a request sent whose first token has not arrived",
    "Jain's index": "(Σx)² / (n·Σx²) over clients' service rates while active (service / time with a "
                    "request in flight): 1 = every active client served at the same rate, 1/n = one took all",
    "largest service gap": "over every pair of clients and every stretch of time when both were backlogged, "
                           "the largest difference in service they received during that stretch",
}


def jain_index(values: Sequence[float]) -> float | None:
    """Jain's fairness index of non-negative values; None when there is nothing to compare."""
    array = np.asarray(values, dtype=float)
    if array.size == 0 or not np.any(array > 0):
        return None
    return float(array.sum() ** 2 / (array.size * np.square(array).sum()))


def _completed(row: dict) -> bool:
    return bool(row["success"] and row["chunk_times_s"])


def _service_events(rows: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """(times, amounts) of every credit of service, times sorted, seconds since the run start."""
    times: list[float] = []
    amounts: list[float] = []
    for row in rows:
        if not _completed(row):
            continue
        chunks = row["chunk_times_s"]
        per_chunk = OUTPUT_WEIGHT * row["output_tokens"] / len(chunks)
        for index, chunk_time in enumerate(chunks):
            times.append(row["sent_s"] + chunk_time)
            amounts.append(per_chunk + (PROMPT_WEIGHT * row["input_tokens"] if index == 0 else 0.0))
    order = np.argsort(times, kind="stable")
    return np.asarray(times)[order], np.asarray(amounts)[order]


def _cumulative(events: tuple[np.ndarray, np.ndarray], grid: np.ndarray) -> np.ndarray:
    times, amounts = events
    totals = np.concatenate([[0.0], np.cumsum(amounts)])
    return totals[np.searchsorted(times, grid, side="right")]


def _covered(intervals: list[tuple[float, float]], grid: np.ndarray) -> np.ndarray:
    """Whether each grid time lies in at least one [start, end) interval."""
    if not intervals:
        return np.zeros(grid.shape, dtype=bool)
    starts = np.sort([start for start, _ in intervals])
    ends = np.sort([end for _, end in intervals])
    return (np.searchsorted(starts, grid, side="right") - np.searchsorted(ends, grid, side="right")) > 0


def _largest_gap(service_a: np.ndarray, service_b: np.ndarray, both: np.ndarray) -> float:
    """Largest |service difference accumulated since the stretch began| over stretches where `both`."""
    largest = 0.0
    index, count = 0, len(both)
    while index < count:
        if not both[index]:
            index += 1
            continue
        end = index
        while end < count and both[end]:
            end += 1
        difference = (service_a[index:end] - service_a[index]) - (service_b[index:end] - service_b[index])
        largest = max(largest, float(np.abs(difference).max()))
        index = end
    return largest


def summarize_fairness(rows: list[dict], duration_s: float) -> dict | None:
    """Per-client numbers and the fairness measures of one run; None without client labels."""
    clients = sorted({row["client"] for row in rows if row.get("client")})
    if not clients:
        return None
    grid = np.linspace(0.0, max(duration_s, 1e-9), TIMELINE_POINTS + 1)
    step = grid[1] - grid[0]
    per_client: dict[str, dict] = {}
    service_curves: dict[str, np.ndarray] = {}
    backlogged: dict[str, np.ndarray] = {}
    for client in clients:
        own = [row for row in rows if row.get("client") == client]
        done = [row for row in own if _completed(row)]
        service_curves[client] = _cumulative(_service_events(own), grid)
        backlogged[client] = _covered([(r["sent_s"], r["sent_s"] + r["chunk_times_s"][0]) for r in done], grid)
        active = _covered([(r["sent_s"], r["sent_s"] + r["chunk_times_s"][-1]) for r in done], grid)
        active_s = float(active.sum() * step)
        service = float(service_curves[client][-1])
        tpots = [t for r in done for t in [time_per_output_token(r["chunk_times_s"][-1], r["chunk_times_s"][0],
                                                                 r["output_tokens"])] if t is not None]
        per_client[client] = {
            "requests": len(own), "completed": len(done),
            "output_tokens": sum(r["output_tokens"] for r in done),
            "service": service, "active_s": active_s,
            "service_rate_while_active": service / active_s if active_s > 0 else None,
            "ttft_ms": describe([r["chunk_times_s"][0] for r in done], 1e3),
            "tpot_ms": describe(tpots, 1e3),
            "e2e_ms": describe([r["chunk_times_s"][-1] for r in done], 1e3),
        }
    rates = [c["service_rate_while_active"] for c in per_client.values() if c["service_rate_while_active"]]
    gaps = {f"{a} / {b}": _largest_gap(service_curves[a], service_curves[b], backlogged[a] & backlogged[b])
            for a, b in combinations(clients, 2)}
    largest_pair = max(gaps, key=gaps.__getitem__) if gaps else None
    costs = [PROMPT_WEIGHT * r["input_tokens"] + OUTPUT_WEIGHT * r["output_tokens"] for r in rows if _completed(r)]
    return {
        "weights": {"prompt_token": PROMPT_WEIGHT, "output_token": OUTPUT_WEIGHT},
        "per_client": per_client,
        "jain_index": jain_index(rates),
        "largest_backlogged_service_gap": gaps[largest_pair] if largest_pair else None,
        "largest_gap_pair": largest_pair,
        "largest_request_cost": max(costs) if costs else None,
        "timeline": {"times_s": grid[::10].tolist(),
                     "service": {client: curve[::10].tolist() for client, curve in service_curves.items()}},
    }

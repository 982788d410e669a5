"""When each request (or conversation) is sent: the open-loop arrival processes.

Gaps between arrivals are gamma distributed with shape = burstiness and
scale = 1 / (rate · burstiness): the mean gap is always 1 / rate, burstiness 1 is a Poisson
process, below 1 arrivals come in clumps, above 1 they are more evenly spaced. This is the
parameterisation of BENCHMARKING.md (and of vLLM's `--burstiness`).
"""

from __future__ import annotations

import math

import numpy as np


def arrival_offsets(num_arrivals: int, rate: float, burstiness: float = 1.0,
                    rng: np.random.Generator | None = None) -> list[float]:
    """Send times in seconds after the start of the run; the first request goes at 0.

    rate = inf sends everything at once (a burst the concurrency cap then meters out).
    """
    if num_arrivals < 0:
        raise ValueError(f"num_arrivals must be >= 0 (got {num_arrivals})")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s or inf (got {rate})")
    if not burstiness > 0:
        raise ValueError(f"burstiness must be > 0 (got {burstiness})")
    if num_arrivals == 0:
        return []
    if math.isinf(rate):
        return [0.0] * num_arrivals
    rng = rng if rng is not None else np.random.default_rng()
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=num_arrivals - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def parse_rate(text: str) -> float:
    """Requests per second from "4", "0.5" or "inf"."""
    value = float(text)
    if not value > 0:
        raise ValueError(f"rate must be > 0 or inf (got {text!r})")
    return value

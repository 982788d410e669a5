"""The server's own counters over a run, read from its Prometheus /metrics.

Client-side timings say how a server behaved; its counters say why (how many requests it
preempted, how many prompt tokens its prefix cache saved). fitserve, vLLM and SGLang all
expose Prometheus text at /metrics, so the bench reads every counter before and after the
load and records the differences; a server without /metrics simply gets none.
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def read_counters(base_url: str, api_key: str | None = None, timeout_s: float = 5.0) -> dict[str, float] | None:
    """Every counter's value (labelled samples summed per name), or None when the server
    has no readable /metrics."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url.rstrip('/')}/metrics", headers=headers, timeout=timeout_s)
        if response.status_code != 200:
            return None
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    counters: dict[str, float] = {}
    for family in families:
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                counters[sample.name] = counters.get(sample.name, 0.0) + sample.value
    return counters


def counter_deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    """What each counter grew by over the run (counters that appeared count from zero)."""
    if before is None or after is None:
        return None
    return {name: value - before.get(name, 0.0) for name, value in sorted(after.items())}

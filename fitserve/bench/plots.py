"""Figures for the HTML report, returned as base64 PNGs so the report is one offline file.

matplotlib's Agg backend draws without a display (servers, CI, headless machines).
"""

from __future__ import annotations

import base64
import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

from fitserve.bench.metrics import inter_token_latencies, time_per_output_token  # noqa: E402


def _to_base64(figure) -> str:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=90)
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _latencies_ms(requests: list[dict]) -> dict[str, list[float]]:
    """TTFT, TPOT, ITL and E2E in ms from stored request rows (completed requests only)."""
    values: dict[str, list[float]] = {"TTFT": [], "TPOT": [], "ITL": [], "E2E": []}
    for row in requests:
        chunks = row["chunk_times_s"]
        if not row["success"] or not chunks:
            continue
        values["TTFT"].append(chunks[0] * 1e3)
        values["E2E"].append(chunks[-1] * 1e3)
        tpot = time_per_output_token(chunks[-1], chunks[0], row["output_tokens"])
        if tpot is not None:
            values["TPOT"].append(tpot * 1e3)
        values["ITL"].extend(gap * 1e3 for gap in inter_token_latencies(chunks))
    return values


def latency_cdfs(runs: list[dict]) -> str | None:
    """One panel per metric, one line per run: the whole distribution, tails included."""
    if not any(run["requests"] for run in runs):
        return None
    figure, axes = plt.subplots(1, 4, figsize=(16, 3.6))
    for run in runs:
        latencies = _latencies_ms(run["requests"])
        for axis, (name, values) in zip(axes, latencies.items()):
            if not values:
                continue
            ordered = np.sort(values)
            # Start the curve at 0 on the fastest value so the first step is visible.
            axis.step(np.concatenate([[ordered[0]], ordered]),
                      np.concatenate([[0.0], np.arange(1, len(ordered) + 1) / len(ordered)]),
                      where="post", label=run["label"], linewidth=2)
    for axis, name in zip(axes, ("TTFT", "TPOT", "ITL", "E2E")):
        axis.set_title(f"{name} CDF")
        axis.set_ylim(0, 1.02)
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests" if name != "ITL" else "fraction of gaps")
        axis.grid(alpha=0.3)
    if len(runs) > 1:
        axes[0].legend(fontsize=7)
    return _to_base64(figure)


def rate_sweep(runs: list[dict]) -> str | None:
    """Throughput and latency against offered rate (only for runs at finite rates)."""
    points = sorted(((run["rate"], run["summary"]) for run in runs
                     if run.get("rate") is not None and np.isfinite(run["rate"])), key=lambda p: p[0])
    if len(points) < 2:
        return None
    rates = [rate for rate, _ in points]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    lines = left.plot(rates, [s["output_throughput"] for _, s in points], "o-", linewidth=2,
                      label="output tokens/s")
    twin = left.twinx()
    lines += twin.plot(rates, [s["request_throughput"] for _, s in points], "^:", color="tab:orange",
                       label="completed requests/s")
    if any(s.get("goodput") is not None for _, s in points):
        lines += twin.plot(rates, [s.get("goodput") or 0 for _, s in points], "s--", color="tab:green",
                           label="goodput (requests/s)")
    twin.set_ylabel("requests/s")
    left.legend(lines, [line.get_label() for line in lines], fontsize=7, loc="best")
    left.set_xlabel("offered rate (requests/s)")
    left.set_ylabel("output tokens/s")
    left.set_title("Throughput vs rate")
    left.grid(alpha=0.3)
    for key, label in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("e2e_ms", "E2E")):
        for stat, style in (("median", "o-"), ("p99", "x:")):
            right.plot(rates, [s[key][stat] for _, s in points], style, label=f"{label} {stat}")
    right.set_yscale("log")
    right.set_xlabel("offered rate (requests/s)")
    right.set_ylabel("ms")
    right.set_title("Latency vs rate")
    right.legend(fontsize=7)
    right.grid(alpha=0.3)
    return _to_base64(figure)


def hardware_timeline(run: dict) -> tuple[str, str] | None:
    """(PNG, caption) of server memory, CPU use and, where measured, GPU power and memory over
    the run; the caption names exactly the panels drawn. Every axis starts at 0, so a small
    change looks small (a 25 MiB rise on 1 GiB is not a cliff)."""
    samples = run.get("hardware", {}).get("samples") or []
    if len(samples) < 2:
        return None
    times = [sample["time_s"] for sample in samples]
    panels = []
    if samples[0]["server_rss_bytes"] is not None:
        panels.append(("Server memory (RSS)", "MiB",
                       {"RSS": [s["server_rss_bytes"] / 2**20 for s in samples]}))
    cpu = {"machine": [s["system_cpu_pct"] for s in samples]}
    if samples[0]["server_cpu_pct"] is not None:
        cpu["server (100 = 1 core)"] = [s["server_cpu_pct"] for s in samples]
    panels.append(("CPU use", "%", cpu))
    if samples[0]["gpus"]:
        power = {f"GPU {i}": [(s["gpus"][i].get("power_w") or np.nan) for s in samples]
                 for i in range(len(samples[0]["gpus"]))}
        memory = {f"GPU {i}": [(s["gpus"][i].get("memory_used_bytes") or np.nan) / 2**30 for s in samples]
                  for i in range(len(samples[0]["gpus"]))}
        panels += [("GPU power", "W", power), ("GPU memory", "GiB", memory)]
    figure, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.4), squeeze=False)
    for axis, (title, unit, series) in zip(axes[0], panels):
        for name, values in series.items():
            axis.plot(times, values, label=name, linewidth=2)
        axis.set_title(title)
        axis.set_xlabel("seconds into the run")
        axis.set_ylabel(unit)
        # A counter may be missing in some samples (None): it does not count for the scale.
        finite = [value for values in series.values() for value in values
                  if value is not None and np.isfinite(value)]
        axis.set_ylim(0, max(max(finite, default=0) * 1.1, 100 if unit == "%" else 1e-9))
        axis.grid(alpha=0.3)
        if len(series) > 1:
            axis.legend(fontsize=7)
    names = [title for title, _, _ in panels]
    return _to_base64(figure), f"{', '.join(names[:-1])} and {names[-1]} over time ({run['label']})"


def client_fairness(run: dict) -> str | None:
    """Multi-tenant runs: each client's cumulative service over time, and its TTFT p50 / p90."""
    fairness = run.get("fairness")
    if not fairness:
        return None
    timeline = fairness["timeline"]
    clients = list(fairness["per_client"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 3.8))
    for client in clients:
        left.plot(timeline["times_s"], timeline["service"][client], label=client, linewidth=2)
    left.set_title("Service received (VTC-weighted tokens)")
    left.set_xlabel("seconds into the run")
    left.set_ylabel("cumulative service")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    positions = np.arange(len(clients))
    for offset, stat in ((-0.2, "median"), (0.2, "p90")):
        values = [fairness["per_client"][c]["ttft_ms"][stat] or 0.0 for c in clients]
        right.bar(positions + offset, values, width=0.4, label=f"TTFT {stat}")
    right.set_xticks(positions, clients)
    right.set_ylabel("ms")
    right.set_title("TTFT per client")
    right.grid(alpha=0.3, axis="y")
    right.legend(fontsize=7)
    return _to_base64(figure)

"""Writing a bench report: one JSON with everything, a CSV of requests, an offline HTML page,
and the summary table printed at the end of a run."""

from __future__ import annotations

import csv
import html
import json
import math
from pathlib import Path

from fitserve.bench.fairness import FAIRNESS_DEFINITIONS
from fitserve.bench.metrics import METRIC_DEFINITIONS

NOT_MEASURED = "not measured on this machine"
LATENCY_KEYS = (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2e_ms", "E2E"))
STATS = ("mean", "median", "p90", "p99", "min", "max")
CSV_COLUMNS = ("run", "request_id", "conversation_id", "turn_index", "success", "error",
               "scheduled_s", "sent_s", "input_tokens", "requested_output_tokens", "output_tokens",
               "output_tokens_source", "ttft_ms", "tpot_ms", "e2e_ms", "num_chunks")


def _json_safe(value):
    """inf/nan are not JSON: written as strings so every parser can read the file back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return value


def write_json(report: dict, path: Path) -> None:
    path.write_text(json.dumps(_json_safe(report), indent=1))


def write_csv(report: dict, path: Path) -> None:
    """One row per request of every run, with its derived latencies in ms."""
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for run in report["runs"]:
            for row in run["requests"]:
                chunks = row["chunk_times_s"]
                ttft = chunks[0] * 1e3 if row["success"] and chunks else None
                e2e = chunks[-1] * 1e3 if row["success"] and chunks else None
                tpot = ((e2e - ttft) / (row["output_tokens"] - 1)
                        if ttft is not None and row["output_tokens"] > 1 else None)
                writer.writerow({**{key: row[key] for key in CSV_COLUMNS if key in row},
                                 "run": run["label"], "ttft_ms": ttft, "tpot_ms": tpot,
                                 "e2e_ms": e2e, "num_chunks": len(chunks)})


def fmt(value, digits: int = 1, missing: str = "n/a") -> str:
    if value is None:
        return missing
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:,.{digits}f}"
    return str(value)


def fmt_bytes(value) -> str:
    return NOT_MEASURED if value is None else f"{value / 2**20:,.1f} MiB"


def fmt_rate(value: float | None, unit: str) -> str:
    """A per-second rate with the SI prefix people read: 33.2 GB/s, 431 GFLOP/s, 1.71 TFLOP/s."""
    if value is None:
        return NOT_MEASURED
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:,.3g} {prefix}{unit}/s"
    return f"{value:,.3g} {unit}/s"


def hardware_limit_rows(limit: dict) -> list[tuple[str, str]]:
    """The measured bandwidth and matmul rate in GB/s and FLOP/s, with how they were measured."""
    rows = [
        ("memory bandwidth", fmt_rate(limit.get("memory_bandwidth_bytes_per_s"), "B")),
        ("matmul throughput", f"{fmt_rate(limit.get('matmul_flops_per_s'), 'FLOP')} "
                              f"({limit.get('dtype')} on {limit.get('device')}, computed in "
                              f"{limit.get('matmul_arithmetic')}, best at {limit.get('matmul_size')}²)"),
    ]
    measurements = limit.get("measurements") or []
    if len(measurements) > 1:
        rows.append(("measured before / after the runs (the higher is used)", "; ".join(
            f"{fmt_rate(m['memory_bandwidth_bytes_per_s'], 'B')}, {fmt_rate(m['matmul_flops_per_s'], 'FLOP')}"
            for m in measurements)))
    if limit.get("threads") is not None:
        rows.append(("CPU threads", str(limit["threads"])))
    rows.append(("method", str(limit.get("method", ""))))
    return rows


def summary_rows(run: dict) -> list[tuple[str, str]]:
    """(name, value) lines that describe one run; shared by the console and the HTML."""
    summary = run["summary"]
    rows = [
        ("requests completed / failed", f"{summary['completed']} / {summary['failed']}"),
        ("failures by kind", ", ".join(f"{k}: {v}" for k, v in summary["failure_reasons"].items()) or "none"),
        ("wall time (s)", fmt(summary["duration_s"], 2)),
        ("request throughput (req/s)", fmt(summary["request_throughput"], 3)),
        ("output throughput (tok/s)", fmt(summary["output_throughput"], 1)),
        ("total token throughput (tok/s)", fmt(summary["total_token_throughput"], 1)),
    ]
    if summary.get("goodput") is not None:
        rows.append(("goodput (req/s meeting every SLO)", fmt(summary["goodput"], 3)))
        rows.append(("SLO attainment", f"{summary['slo_attainment'] * 100:.1f} %"))
    for key, name in LATENCY_KEYS:
        stats = summary[key]
        rows.append((f"{name} ms mean / median / p90 / p99 / min / max",
                     " / ".join(fmt(stats[stat]) for stat in STATS)))
    return rows


def fairness_rows(run: dict) -> list[tuple[str, str]]:
    """Multi-tenant runs: the fairness measures and each client's latency (none otherwise)."""
    fairness = run.get("fairness")
    if not fairness:
        return []
    gap = fairness["largest_backlogged_service_gap"]
    rows = [("Jain's fairness index (service rate while active)", fmt(fairness["jain_index"], 3)),
            ("largest service gap between backlogged clients",
             f"{fmt(gap, 0)} ({fairness['largest_gap_pair'] or 'no pair'}; largest single request "
             f"costs {fmt(fairness['largest_request_cost'], 0)})")]
    for client, numbers in fairness["per_client"].items():
        ttft, e2e = numbers["ttft_ms"], numbers["e2e_ms"]
        rows.append((f"{client}: completed, service, TTFT ms median / p90 / p99, E2E ms p90",
                     f"{numbers['completed']}/{numbers['requests']}, {fmt(numbers['service'], 0)}, "
                     f"{fmt(ttft['median'])} / {fmt(ttft['p90'])} / {fmt(ttft['p99'])}, {fmt(e2e['p90'])}"))
    return rows


def hardware_rows(run: dict) -> list[tuple[str, str]]:
    hardware = run.get("hardware", {}).get("summary") or {}
    rows = [
        ("server RSS peak / idle", f"{fmt_bytes(hardware.get('server_rss_peak_bytes'))} / "
                                   f"{fmt_bytes(hardware.get('server_rss_idle_bytes'))}"),
        ("server CPU mean (100 % = 1 core)", fmt(hardware.get("server_cpu_mean_pct"), 0, NOT_MEASURED)),
        ("machine CPU mean / idle (%)", f"{fmt(hardware.get('system_cpu_mean_pct'), 0, NOT_MEASURED)} / "
                                        f"{fmt(hardware.get('system_cpu_idle_pct'), 0, NOT_MEASURED)}"),
    ]
    cpu_energy = hardware.get("cpu_energy")
    if cpu_energy:
        rows.append(("CPU energy above idle (J) / per output token (J)",
                     f"{fmt(cpu_energy['energy_above_idle_j'], 2, NOT_MEASURED)} / "
                     f"{fmt(cpu_energy['energy_per_output_token_j'], 4, NOT_MEASURED)}"))
    else:
        rows.append(("CPU energy (RAPL)", NOT_MEASURED))
    for index, gpu in enumerate(hardware.get("gpus") or []):
        rows.append((f"GPU {index} energy above idle (J) / per token (J)",
                     f"{fmt(gpu['energy_above_idle_j'], 2, NOT_MEASURED)} / "
                     f"{fmt(gpu['energy_per_output_token_j'], 4, NOT_MEASURED)}"))
        rows.append((f"GPU {index} mean / idle power (W)",
                     f"{fmt(gpu['mean_power_w'], 1, NOT_MEASURED)} / {fmt(gpu['idle_power_w'], 1, NOT_MEASURED)}"))
        rows.append((f"GPU {index} memory peak, max temperature",
                     f"{fmt_bytes(gpu['memory_peak_bytes'])}, {fmt(gpu['temperature_max_c'], 0, NOT_MEASURED)} °C"))
    if not hardware.get("gpus"):
        rows.append(("GPU memory / power / energy (NVML)", NOT_MEASURED))
    temperatures = hardware.get("max_temperature_c")
    rows.append(("max temperatures (°C)", ", ".join(f"{k}: {v:.0f}" for k, v in temperatures.items())
                 if temperatures else NOT_MEASURED))
    return rows


def roofline_rows(run: dict) -> list[tuple[str, str]]:
    fractions = run.get("roofline")
    if not fractions:
        return [("hardware limit", "not computed (no model config, or --no-roofline)")]
    rows = []
    decode, prefill = fractions.get("decode"), fractions.get("prefill")
    if decode:
        rows.append(("decode: achieved / bound tok/s (fraction)",
                     f"{fmt(decode['achieved_tokens_per_s'])} / {fmt(decode['bound_tokens_per_s'])} "
                     f"({decode['fraction_of_limit'] * 100:.1f} % of the {decode['bound']} bound, "
                     f"batch {decode['mean_batch']:.2f}, context {decode['mean_context_tokens']:.0f})"))
    if prefill:
        rows.append(("prefill: achieved / bound tok/s (fraction)",
                     f"{fmt(prefill['achieved_tokens_per_s'])} / {fmt(prefill['bound_tokens_per_s'])} "
                     f"({prefill['fraction_of_limit'] * 100:.1f} % of the {prefill['bound']} bound, "
                     f"fastest TTFT, {prefill['prompt_tokens']:.0f}-token prompts)"))
    if any(phase and phase["fraction_of_limit"] > 1 for phase in (decode, prefill)):
        rows.append(("note", "a fraction above 100 % means the micro-benchmark caught this machine "
                             "below its peak (other work was running): treat the limit as a floor"))
    return rows or [("hardware limit", "no completed request to compare")]


def print_summary(report: dict) -> None:
    """The end-of-run table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    for run in report["runs"]:
        table = Table(title=f"fitserve bench — {run['label']}", show_header=False)
        table.add_column("metric", style="bold")
        table.add_column("value")
        for name, value in summary_rows(run) + fairness_rows(run) + roofline_rows(run) + hardware_rows(run):
            table.add_row(name, value)
        console.print(table)
    if report.get("slo_search"):
        search = report["slo_search"]
        console.print(f"highest rate meeting the SLO: {fmt(search['max_rate_meeting_slo'], 3)} req/s")


def _table(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{html.escape(name)}</th><td>{html.escape(value)}</td></tr>"
                               for name, value in rows) + "</table>"


def _dict_table(values: dict) -> str:
    return _table([(str(key), json.dumps(_json_safe(value)) if isinstance(value, (dict, list)) else fmt(value, 3))
                   for key, value in values.items()])


def _image(encoded: str | None, alt: str) -> str:
    if encoded is None:
        return ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{encoded}"><figcaption>{html.escape(alt)}</figcaption></figure>'


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1300px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f3f3f3;font-weight:600}img{max-width:100%}figure{margin:1em 0}code{background:#f3f3f3;padding:0 .2em}"""


def _runs_table(runs: list[dict]) -> str:
    """Every run's summary in one table, one column per run, so a sweep reads across."""
    columns = [dict(summary_rows(run) + fairness_rows(run) + roofline_rows(run)) for run in runs]
    names = list(dict.fromkeys(name for column in columns for name in column))
    header = "<tr><th>metric</th>" + "".join(f"<th>{html.escape(run['label'])}</th>" for run in runs) + "</tr>"
    body = "".join("<tr><th>" + html.escape(name) + "</th>" +
                   "".join(f"<td>{html.escape(column.get(name, ''))}</td>" for column in columns) + "</tr>"
                   for name in names)
    return f"<table>{header}{body}</table>"


def write_html(report: dict, path: Path) -> None:
    """One self-contained page: results and plots first, then hardware, then the setup."""
    from fitserve.bench import plots  # matplotlib is slow to import: only when a page is written

    runs = report["runs"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>fitserve bench</title>"
             f"<style>{_STYLE}</style></head><body><h1>fitserve bench report</h1>",
             f"<p>Created {html.escape(report['created'])}. Command: <code>{html.escape(' '.join(report['command']))}</code></p>",
             "<h2>Results</h2>", _runs_table(runs),
             _image(plots.latency_cdfs(runs), "Latency CDFs (TTFT, TPOT, ITL, E2E)")]
    for run in runs:
        parts.append(_image(plots.client_fairness(run), f"Service and TTFT per client ({run['label']})"))
    sweep = plots.rate_sweep(runs)
    if sweep:
        parts += ["<h2>Rate sweep</h2>", _image(sweep, "Throughput and latency vs offered rate")]
    if report.get("slo_search"):
        parts += ["<h2>SLO search</h2>", _dict_table(report["slo_search"])]
    for run in runs:
        timeline = plots.hardware_timeline(run)
        parts += [f"<h2>Hardware: {html.escape(run['label'])}</h2>", _table(hardware_rows(run)),
                  _image(*timeline) if timeline else ""]
    parts += [f"<p>{html.escape(report['baseline_note'])}</p>"]
    if report.get("hardware_limit"):
        parts += ["<h2>Hardware limit (measured in this run)</h2>",
                  _table(hardware_limit_rows(report["hardware_limit"]))]
    parts += ["<h2>Setup</h2>", _dict_table(report["environment"]),
              "<h3>Server</h3>", _dict_table(report["server"]),
              "<h3>Model</h3>", _dict_table(report["model"] or {"model": "unknown (no config.json given)"}),
              "<h3>Workload and load</h3>", _dict_table(report["workload"]), _dict_table(report["load"])]
    if report.get("slo"):
        parts += ["<h3>SLO</h3>", _dict_table(report["slo"])]
    definitions = list(METRIC_DEFINITIONS.items())
    if any(run.get("fairness") for run in runs):
        definitions += list(FAIRNESS_DEFINITIONS.items())
    parts += ["<h3>Metric definitions</h3>", _table(definitions), "</body></html>"]
    path.write_text("\n".join(parts), encoding="utf-8")


def write_all(report: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "bench.json", "csv": out_dir / "requests.csv", "html": out_dir / "report.html"}
    write_json(report, paths["json"])
    write_csv(report, paths["csv"])
    write_html(report, paths["html"])
    return paths

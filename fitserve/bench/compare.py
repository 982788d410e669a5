"""`fitserve bench compare A.json B.json`: two reports side by side, with B / A ratios."""

from __future__ import annotations

import json
import math
from pathlib import Path

from fitserve.bench.report import LATENCY_KEYS, fmt

_THROUGHPUTS = (("request_throughput", "request throughput (req/s)"),
                ("output_throughput", "output throughput (tok/s)"),
                ("total_token_throughput", "total token throughput (tok/s)"),
                ("goodput", "goodput (req/s)"))


def load_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read bench report {path}: {error}") from error
    if not str(report.get("format", "")).startswith("fitserve-bench/"):
        raise ValueError(f"{path} is not a fitserve bench JSON (no 'format': 'fitserve-bench/…')")
    return report


def comparison_rows(report_a: dict, report_b: dict) -> list[tuple[str, str, str, str]]:
    """(metric, A, B, B/A) for the runs the two reports have in common, matched by position."""
    rows: list[tuple[str, str, str, str]] = []
    for run_a, run_b in zip(report_a["runs"], report_b["runs"]):
        prefix = run_a["label"] if run_a["label"] == run_b["label"] else f"{run_a['label']} | {run_b['label']}"
        summary_a, summary_b = run_a["summary"], run_b["summary"]
        rows.append((f"[{prefix}] completed / failed",
                     f"{summary_a['completed']} / {summary_a['failed']}",
                     f"{summary_b['completed']} / {summary_b['failed']}", ""))
        for key, name in _THROUGHPUTS:
            rows.append((f"[{prefix}] {name}", fmt(summary_a.get(key), 3), fmt(summary_b.get(key), 3),
                         _ratio(summary_a.get(key), summary_b.get(key))))
        for key, name in LATENCY_KEYS:
            for stat in ("median", "p99"):
                value_a, value_b = summary_a[key][stat], summary_b[key][stat]
                rows.append((f"[{prefix}] {name} {stat} (ms)", fmt(value_a), fmt(value_b), _ratio(value_a, value_b)))
        for phase in ("decode", "prefill"):
            fraction_a = ((run_a.get("roofline") or {}).get(phase) or {}).get("fraction_of_limit")
            fraction_b = ((run_b.get("roofline") or {}).get(phase) or {}).get("fraction_of_limit")
            if fraction_a is not None or fraction_b is not None:
                rows.append((f"[{prefix}] {phase} fraction of hardware limit",
                             _percent(fraction_a), _percent(fraction_b), _ratio(fraction_a, fraction_b)))
    if len(report_a["runs"]) != len(report_b["runs"]):
        rows.append(("runs", str(len(report_a["runs"])), str(len(report_b["runs"])),
                     "only the first runs of each were compared"))
    return rows


def _percent(value) -> str:
    return "n/a" if value is None else f"{value * 100:.1f} %"


def _ratio(value_a, value_b) -> str:
    if value_a is None or value_b is None or isinstance(value_a, str) or isinstance(value_b, str):
        return ""
    if value_a == 0 or not math.isfinite(value_a) or not math.isfinite(value_b):
        return ""
    return f"{value_b / value_a:.3f}×"


def run_compare(path_a: str, path_b: str) -> int:
    from rich.console import Console
    from rich.table import Table

    report_a, report_b = load_report(path_a), load_report(path_b)
    table = Table(title="fitserve bench compare")
    table.add_column("metric", style="bold")
    table.add_column("A", justify="right")
    table.add_column("B", justify="right")
    table.add_column("B / A", justify="right")
    for row in comparison_rows(report_a, report_b):
        table.add_row(*row)
    console = Console()
    console.print(table)
    for name, path, report in (("A", path_a, report_a), ("B", path_b, report_b)):
        environment = report.get("environment", {})
        console.print(f"{name} = {path}: {environment.get('cpu')} · gpus {environment.get('gpus')} · "
                      f"torch {environment.get('torch')} · model {((report.get('model') or {}).get('dtype_name'))} · "
                      f"workload {report.get('workload')}")
    return 0

"""Running `fitserve bench` against fresh fitserve servers with different settings, for the
side-by-side benchmark scripts (fair_scheduling.py, swap_preemption.py)."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def bench_run(bench_args: list[str], server_args: str, out_dir: Path) -> dict:
    """One `fitserve bench` run (it starts and stops its own server with `server_args`);
    returns the run's record from bench.json."""
    from fitserve.bench.cli import main as bench_main

    code = bench_main([*bench_args, "--server-args", server_args, "--no-roofline", "--no-hardware",
                       "--no-progress", "--out", str(out_dir)])
    if code != 0:
        raise SystemExit(f"the bench run with server args {server_args!r} failed (exit {code}); see {out_dir}")
    return json.loads((out_dir / "bench.json").read_text())["runs"][0]


def medians(runs: dict[str, list[dict]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per setting, the median over repetitions of each number in `keys`."""
    return {setting: {key: statistics.median(run[key] for run in results) for key in keys}
            for setting, results in runs.items()}


def result_header(benchmark: str, what: str, args: argparse.Namespace) -> dict:
    """What every side-by-side result file starts with: what ran, where, with which flags."""
    from common import describe_machine

    return {"benchmark": benchmark, "what": what, "machine": describe_machine(),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}

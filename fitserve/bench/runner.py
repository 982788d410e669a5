"""One bench session: set up (server, tokenizer, counters, hardware limit), run the load plan
(one rate, a sweep, or a search for the highest rate meeting an SLO), and build the report."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import sys
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from fitserve.bench.arrivals import arrival_offsets
from fitserve.bench.client import StreamClient
from fitserve.bench.fairness import summarize_fairness
from fitserve.bench.hardware import HardwareSampler, summarize_hardware
from fitserve.bench.load import run_load
from fitserve.bench.metrics import Slo, summarize
from fitserve.bench.roofline import ModelShape, achieved_fractions
from fitserve.bench.server_counters import counter_deltas, read_counters
from fitserve.bench.workload import PromptMaker, WorkloadConfig, build_workload

BASELINE_NOTE = ("Energy figures are the run's energy minus the idle power measured just before the "
                 "runs (no requests in flight) times the run's duration; counters this machine does "
                 "not have are shown as 'not measured on this machine', never as zero.")


@dataclass
class LoadPlan:
    rates: list[float]
    """Offered request rates; several make a sweep."""
    max_concurrency: int | None
    burstiness: float
    seed: int
    slo: Slo | None
    search: bool = False
    """Search for the highest rate meeting the SLO at its percentile, starting at rates[0]."""
    search_steps: int = 4
    """Bisection steps after the rate that passes and the rate that fails are bracketed."""
    max_search_probes: int = 8
    """Cap on doubling/halving probes before bisection."""

    def _arrivals(self) -> str:
        """How requests arrive, in words; only finite rates have an arrival process at all."""
        timed = "Poisson" if self.burstiness == 1 else f"gamma, burstiness {self.burstiness:g}"
        untimed = (f"none: a closed loop of {self.max_concurrency} streams (a request starts when one ends)"
                   if self.max_concurrency else "none: every request at once")
        if all(math.isinf(rate) for rate in self.rates):
            return untimed
        if any(math.isinf(rate) for rate in self.rates):
            return f"{timed} at finite rates; at rate inf {untimed.removeprefix('none: ')}"
        return timed

    def describe(self) -> dict:
        mode = ("closed loop" if all(math.isinf(r) for r in self.rates) and self.max_concurrency
                else "open loop")
        described = {"mode": mode, "rates_req_per_s": self.rates, "max_concurrency": self.max_concurrency,
                     "arrivals": self._arrivals(), "seed": self.seed}
        if self.search:
            described["search"] = f"highest rate meeting the SLO, {self.search_steps} bisection steps"
        return described


@dataclass
class BenchContext:
    """Everything a run needs that does not change between runs of one session."""

    client: StreamClient
    workload: WorkloadConfig
    prompt_maker: PromptMaker
    sampler: HardwareSampler | None
    idle_samples: list
    shape: ModelShape | None
    hardware_limit: dict | None
    progress: bool = True


def run_one(context: BenchContext, plan: LoadPlan, rate: float, label: str) -> dict:
    """One load run at one rate: requests, summaries, hardware and roofline."""
    conversations = build_workload(context.workload, context.prompt_maker)
    offsets = arrival_offsets(len(conversations), rate, plan.burstiness,
                              np.random.default_rng([plan.seed, 2]))
    total_requests = sum(len(conversation.turns) for conversation in conversations)
    progress_bar = _progress_bar(total_requests, label) if context.progress else None
    failures = 0

    def on_done(result) -> None:
        nonlocal failures
        failures += 0 if result.success else 1
        if progress_bar is not None:
            progress_bar.update(1)
            progress_bar.set_postfix(failed=failures, refresh=False)

    async def load_between_counter_reads(client: StreamClient):
        # After the warm-up request, so the deltas count this run's requests only.
        before = read_counters(client.options.base_url, client.options.api_key)
        load = await run_load(conversations, offsets, client, plan.max_concurrency, on_done)
        return load, counter_deltas(before, read_counters(client.options.base_url, client.options.api_key))

    if context.sampler is not None:
        context.sampler.start()
    try:
        load, server_counters = asyncio.run(_with_client(context.client, load_between_counter_reads))
    finally:
        samples = context.sampler.stop() if context.sampler is not None else []
        if progress_bar is not None:
            progress_bar.close()
    summary = summarize(load.results, load.duration_s, plan.slo)
    rows = [result.to_row() for result in load.results]
    run: dict[str, Any] = {
        "label": label, "rate": rate, "max_concurrency": plan.max_concurrency,
        "started_at_unix": load.started_at_unix, "summary": summary,
        "requests": rows,
        "fairness": summarize_fairness(rows, load.duration_s),
        "hardware": {"summary": summarize_hardware(samples, context.idle_samples, summary["total_output_tokens"]),
                     "samples": [asdict(sample) for sample in samples]} if context.sampler else
                    {"summary": None, "samples": [], "note": "server not on this machine: not measured"},
        "roofline": None,  # filled in by attach_roofline once the limit is measured after the runs
        # What the server's own /metrics counters grew by (None for a server without them).
        "server_counters": server_counters,
    }
    return run


def attach_roofline(runs: list[dict], shape: ModelShape | None, limit: dict | None) -> None:
    """Each run's achieved fraction of the hardware limit (None without a shape or limit)."""
    for run in runs:
        run["roofline"] = achieved_fractions(shape, limit, run["summary"]) if shape and limit else None


async def _with_client(client: StreamClient, body: Callable):
    """Runs `body(client)` in a fresh event loop; httpx pools belong to one loop, so the
    client's connections are reopened per run (after a warm-up request)."""
    client.reopen()
    try:
        warm_up = await client.warm_up()
        if not warm_up.success and (warm_up.error or "").startswith(("HTTP 400", "HTTP 401", "HTTP 403",
                                                                      "HTTP 404", "HTTP 422")):
            # Every request would be refused the same way: say why now instead of after N failures.
            raise ValueError(f"the server refused the warm-up request ({warm_up.error}); check --url, "
                             "--served-model-name, --api-key and --endpoint")
        return await body(client)
    finally:
        await client.close()


def _progress_bar(total: int, label: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=label, unit="req", file=sys.stderr, dynamic_ncols=True)


def rate_label(rate: float, max_concurrency: int | None) -> str:
    if math.isinf(rate):
        return f"concurrency {max_concurrency}" if max_concurrency else "all at once"
    suffix = f", concurrency ≤ {max_concurrency}" if max_concurrency else ""
    return f"{rate:g} req/s{suffix}"


def execute_plan(context: BenchContext, plan: LoadPlan) -> tuple[list[dict], dict | None]:
    """Runs of the plan, and the SLO search's outcome when it searched."""
    if not plan.search:
        return [run_one(context, plan, rate, rate_label(rate, plan.max_concurrency)) for rate in plan.rates], None
    return search_max_rate(context, plan)


def search_max_rate(context: BenchContext, plan: LoadPlan) -> tuple[list[dict], dict]:
    """Highest rate whose run meets the SLO at its percentile: double (or halve) from the
    starting rate until one rate passes and one fails, then bisect between them."""
    if plan.slo is None:
        raise ValueError("--slo-search needs --slo (limits or a preset such as mlperf-server)")
    start = plan.rates[0] if plan.rates and math.isfinite(plan.rates[0]) else 1.0
    runs: list[dict] = []

    def probe(rate: float) -> bool:
        run = run_one(context, plan, rate, f"search {rate:.3g} req/s")
        runs.append(run)
        return bool(run["summary"].get("meets_slo_at_percentile"))

    passing, failing = None, None
    rate = start
    for _ in range(plan.max_search_probes):
        if probe(rate):
            passing = rate
            if failing is not None:
                break
            rate *= 2
        else:
            failing = rate
            if passing is not None:
                break
            rate /= 2
    if passing is not None and failing is not None:
        for _ in range(plan.search_steps):
            middle = (passing + failing) / 2
            if probe(middle):
                passing = middle
            else:
                failing = middle
    outcome = {"slo": plan.slo.to_dict(), "max_rate_meeting_slo": passing,
               "lowest_rate_failing_slo": failing,
               "probes": [{"rate": run["rate"], "meets_slo": run["summary"].get("meets_slo_at_percentile")}
                          for run in runs]}
    return runs, outcome


def build_report(command: list[str], environment: dict, server: dict, context: BenchContext,
                 plan: LoadPlan, runs: list[dict], slo_search: dict | None) -> dict:
    return {
        "format": "fitserve-bench/1",
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment,
        "server": server,
        "model": context.shape.to_dict() if context.shape else None,
        "workload": context.workload.describe() | {
            "prompt_lengths": ("exact, in the model's tokens" if context.prompt_maker.exact
                               else "approximate (random words, no tokenizer)")},
        "load": plan.describe(),
        "slo": plan.slo.to_dict() if plan.slo else None,
        "baseline_note": BASELINE_NOTE,
        "idle_baseline": (summarize_hardware(context.idle_samples, [], 0) if context.idle_samples else None),
        "hardware_limit": context.hardware_limit,
        "runs": runs,
        "slo_search": slo_search,
    }

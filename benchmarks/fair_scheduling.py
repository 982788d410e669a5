"""FCFS against VTC on the bundled model, side by side, with the same arrivals.

One heavy client sends 4x the requests of each of three light ones, at a total rate above
what the server can serve (by default 1.4x the capacity measured at the start of the same
invocation: the machine may be shared, so a fixed rate would mean different loads on
different days), so a queue builds. Under FCFS the light clients wait behind the
heavy client's backlog; under VTC each light client, asking for less than its fair share, is
admitted almost at once. Each repetition runs `fitserve bench --workload multi-tenant` once
per policy (alternating, same seed, so the same prompts at the same times), each against a
fresh `fitserve serve`.

Targets (issue 22): the light clients' p90 TTFT under vtc <= 1/3 of theirs under fcfs, and
total output tokens/s under vtc >= 95 % of fcfs's.

    python benchmarks/fair_scheduling.py                      # writes results/fair_scheduling.json
    python benchmarks/fair_scheduling.py --overload 1.4 --num-requests 600 --repeats 2
    python benchmarks/fair_scheduling.py --rate 40        # a fixed total rate instead
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, write_result  # noqa: E402
from side_by_side import bench_run, medians, result_header  # noqa: E402

POLICIES = ("fcfs", "vtc")
HEAVY = "client-0"


def run_with_policy(policy: str, args: argparse.Namespace, out_dir: Path, rate: float, num_requests: int) -> dict:
    """One `fitserve bench` multi-tenant run against a fresh server using `policy`."""
    server_args = f"--scheduling-policy {policy} --max-num-seqs {args.max_num_seqs} {args.server_args}".strip()
    return bench_run([
        "--workload", "multi-tenant", "--clients", str(len(args.client_rates)),
        "--client-rates", ",".join(f"{weight:g}" for weight in args.client_rates),
        "--num-requests", str(num_requests), "--input-len", str(args.input_len),
        "--output-len", str(args.output_len), "--rate", str(rate), "--seed", str(args.seed),
    ], server_args, out_dir)


def measure_capacity(args: argparse.Namespace, out_dir: Path) -> float:
    """Requests/s the server completes when saturated (everything sent at once), under fcfs."""
    run = run_with_policy("fcfs", args, out_dir, float("inf"), 8 * args.max_num_seqs)
    return run["summary"]["request_throughput"]


def run_policy(policy: str, args: argparse.Namespace, out_dir: Path, rate: float) -> dict:
    """One bench run at `rate` against a server using `policy`; the numbers this comparison needs."""
    run = run_with_policy(policy, args, out_dir, rate, args.num_requests)
    light_ttfts = [row["chunk_times_s"][0] * 1e3 for row in run["requests"]
                   if row["success"] and row["chunk_times_s"] and row["client"] != HEAVY]
    heavy_ttfts = [row["chunk_times_s"][0] * 1e3 for row in run["requests"]
                   if row["success"] and row["chunk_times_s"] and row["client"] == HEAVY]
    fairness = run["fairness"]
    return {
        "policy": policy,
        "completed": run["summary"]["completed"], "failed": run["summary"]["failed"],
        "output_tokens_per_s": run["summary"]["output_throughput"],
        "duration_s": run["summary"]["duration_s"],
        "light_clients_ttft_p90_ms": float(np.percentile(light_ttfts, 90)),
        "light_clients_ttft_median_ms": float(np.percentile(light_ttfts, 50)),
        "heavy_client_ttft_p90_ms": float(np.percentile(heavy_ttfts, 90)),
        "tpot_p90_ms": run["summary"]["tpot_ms"]["p90"],
        "jain_index": fairness["jain_index"],
        "largest_backlogged_service_gap": fairness["largest_backlogged_service_gap"],
        "largest_request_cost": fairness["largest_request_cost"],
        "per_client_ttft_p90_ms": {c: v["ttft_ms"]["p90"] for c, v in fairness["per_client"].items()},
        "per_client_service": {c: v["service"] for c, v in fairness["per_client"].items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=None,
                        help="total requests/s (default: --overload x the capacity measured first)")
    parser.add_argument("--overload", type=float, default=1.4,
                        help="without --rate: the offered rate as a multiple of the measured capacity")
    parser.add_argument("--num-requests", type=int, default=600)
    parser.add_argument("--client-rates", type=lambda t: [float(x) for x in t.split(",")], default=[4, 1, 1, 1])
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=16,
                        help="the server's batch limit: small, so a queue forms at a rate the CPU sustains")
    parser.add_argument("--server-args", default="", help="further flags for fitserve serve")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="runs per policy, alternating fcfs and vtc")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "fair_scheduling.json")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    capacity = None
    with tempfile.TemporaryDirectory(prefix="fair-scheduling-") as scratch:
        rate = args.rate
        if rate is None:
            capacity = measure_capacity(args, Path(scratch) / "capacity")
            rate = args.overload * capacity
            print(f"capacity {capacity:.1f} req/s: offering {rate:.1f} req/s", flush=True)
        for repeat in range(args.repeats):
            for policy in POLICIES:
                result = run_policy(policy, args, Path(scratch) / f"{policy}-{repeat}", rate)
                runs[policy].append(result)
                print(f"[{repeat}] {policy}: light p90 TTFT {result['light_clients_ttft_p90_ms']:.0f} ms, "
                      f"{result['output_tokens_per_s']:.0f} output tok/s, Jain {result['jain_index']:.3f}",
                      flush=True)

    middle = medians(runs, ("light_clients_ttft_p90_ms", "heavy_client_ttft_p90_ms", "output_tokens_per_s",
                             "tpot_p90_ms", "jain_index", "largest_backlogged_service_gap"))
    ttft_ratio = middle["vtc"]["light_clients_ttft_p90_ms"] / middle["fcfs"]["light_clients_ttft_p90_ms"]
    throughput_ratio = middle["vtc"]["output_tokens_per_s"] / middle["fcfs"]["output_tokens_per_s"]
    result = result_header(
        "fair_scheduling",
        "fitserve bench --workload multi-tenant against fitserve serve with --scheduling-policy fcfs and vtc, "
        "alternating, same seed (same prompts and arrival times), bundled model", args) | {
        "measured_capacity_req_per_s": capacity,
        "offered_rate_req_per_s": rate,
        "runs": runs,
        "medians": middle,
        "light_ttft_p90_vtc_over_fcfs": ttft_ratio,
        "output_throughput_vtc_over_fcfs": throughput_ratio,
        "targets": {"light_ttft_p90_ratio_at_most": 1 / 3, "throughput_ratio_at_least": 0.95,
                    "met": ttft_ratio <= 1 / 3 and throughput_ratio >= 0.95},
    }
    path = write_result("fair_scheduling", result, args.out)
    print(f"light clients' p90 TTFT vtc/fcfs = {ttft_ratio:.3f} (target <= 0.333); "
          f"output tok/s vtc/fcfs = {throughput_ratio:.3f} (target >= 0.95); wrote {path}")


if __name__ == "__main__":
    main()

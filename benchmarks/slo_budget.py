"""`--slo` against fixed step budgets, side by side, same requests (issue 22).

Each setting serves the same open-loop workload (prompts long enough that the step budget
decides how much prefill rides along with each decode step) against a fresh server: fixed
`--max-num-batched-tokens` 256, 2048 and 8192, and `--slo` starting from 2048. Goodput
(completed requests/s meeting the TTFT and TPOT targets) is the bench's own. Target: goodput
with `--slo` >= the best fixed budget's, at a rate where a fixed budget misses the SLO.

    python benchmarks/slo_budget.py --rate 4 --num-requests 200 --output-len 64 --repeats 5 --slo ttft=1s,tpot=50ms,p=90 --server-args "--num-threads 1"

Settings take turns, each repetition starting with the next one, and the JSON pairs `--slo`
with the best fixed budget of the same repetition (the machine's speed drifts between runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, write_result  # noqa: E402
from side_by_side import bench_run, medians, result_header  # noqa: E402

FIXED_BUDGETS = (256, 2048, 8192)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slo", default="ttft=2s,tpot=60ms,p=90")
    parser.add_argument("--rate", default="6")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fixed-budgets", default=",".join(map(str, FIXED_BUDGETS)),
                        help="comma-separated fixed step budgets to compare with (default: the target's three)")
    parser.add_argument("--start-budget", type=int, default=2048,
                        help="the --slo server's --max-num-batched-tokens (where its loop starts)")
    parser.add_argument("--skip-slo", action="store_true", help="run only the fixed budgets (a sweep)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "slo_budget.json")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep each run's bench output and server log here (the --slo server logs "
                             "every move of its budget and cap); default: a temporary folder")
    args = parser.parse_args()

    budgets = [int(budget) for budget in args.fixed_budgets.split(",")]
    settings = {f"fixed {budget}": f"--max-num-batched-tokens {budget}" for budget in budgets}
    if not args.skip_slo:
        settings["slo"] = f"--max-num-batched-tokens {args.start_budget} --slo {args.slo}"
    runs: dict[str, list[dict]] = {name: [] for name in settings}
    with tempfile.TemporaryDirectory(prefix="slo-budget-") as temporary:
        scratch = args.runs_dir or temporary
        names = list(settings)
        for repeat in range(args.repeats):
            # Each repetition starts one setting later, so no setting always runs first or
            # last (the machine's speed drifts within a run).
            shift = repeat % len(names)
            for name in names[shift:] + names[:shift]:
                server_flags = settings[name]
                run = bench_run(["--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                                 "--output-len", str(args.output_len), "--rate", args.rate, "--seed", str(args.seed),
                                 "--slo", args.slo], f"{server_flags} {args.server_args}".strip(),
                                Path(scratch) / f"{name.replace(' ', '-')}-{repeat}")
                summary = run["summary"]
                result = {"goodput": summary["goodput"], "slo_attainment": summary["slo_attainment"],
                          "ttft_p90_ms": summary["ttft_ms"]["p90"], "tpot_p90_ms": summary["tpot_ms"]["p90"],
                          "output_tokens_per_s": summary["output_throughput"]}
                runs[name].append(result)
                print(f"[{repeat}] {name}: goodput {result['goodput']:.3f} req/s, attainment "
                      f"{result['slo_attainment']:.2f}, p90 TTFT {result['ttft_p90_ms']:.0f} ms, "
                      f"p90 TPOT {result['tpot_p90_ms']:.1f} ms", flush=True)
    middle = medians(runs, ("goodput", "slo_attainment", "ttft_p90_ms", "tpot_p90_ms", "output_tokens_per_s"))
    best_fixed = max(middle[f"fixed {budget}"]["goodput"] for budget in budgets)
    slo_goodput = middle["slo"]["goodput"] if "slo" in middle else None
    # Paired by repetition: --slo against the best fixed budget of the same repetition.
    slo_over_best_fixed_per_repeat = [
        runs["slo"][repeat]["goodput"] / best
        for repeat in range(args.repeats)
        if "slo" in runs and (best := max(runs[f"fixed {budget}"][repeat]["goodput"] for budget in budgets))
    ]
    result = result_header("slo_budget", "fitserve bench with --slo against servers with fixed step budgets and "
                           "one with the --slo feedback loop, same seed, bundled model", args) | {
        "runs": runs, "medians": middle,
        "slo_goodput_over_best_fixed": slo_goodput / best_fixed if best_fixed and slo_goodput is not None else None,
        "slo_goodput_over_best_fixed_per_repeat": slo_over_best_fixed_per_repeat,
        "target": "goodput with --slo >= the best fixed budget's",
    }
    path = write_result("slo_budget", result, args.out)
    slo_part = f"--slo {slo_goodput:.3f} req/s vs " if slo_goodput is not None else ""
    paired = (f" (per repetition: {', '.join(f'{ratio:.2f}x' for ratio in slo_over_best_fixed_per_repeat)})"
              if slo_over_best_fixed_per_repeat else "")
    print(f"goodput: {slo_part}best fixed {best_fixed:.3f}{paired}; wrote {path}")


if __name__ == "__main__":
    main()

"""Swap against recompute preemption under memory pressure, side by side, same requests.

A KV cache far too small for the requests in flight (`--kv-cache-memory 8MiB`: about 1,300
tokens of the bundled model, for prompts of 200 tokens that generate 200) forces many
preemptions. With recompute, a preempted request computes its prompt and output again; with
swap, its KV goes to host memory and back. Each repetition runs `fitserve bench` once per
mode (alternating; same seed, so the same prompts at the same times).

Target (issue 22): swap's p99 TTFT and p99 TPOT at least 1.4x better than recompute's.

    python benchmarks/swap_preemption.py                 # writes results/swap_preemption.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, write_result  # noqa: E402
from side_by_side import bench_run, medians, result_header  # noqa: E402

MODES = ("recompute", "swap")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kv-cache-memory", default="8MiB")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--rate", default="4", help="requests/s (inf: all at once)")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "swap_preemption.json")
    args = parser.parse_args()

    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory(prefix="swap-preemption-") as scratch:
        for repeat in range(args.repeats):
            for mode in MODES:
                server_args = (f"--preemption-mode {mode} --kv-cache-memory {args.kv_cache_memory} "
                               f"--max-num-seqs {args.max_num_seqs} {args.server_args}").strip()
                run = bench_run(["--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                                 "--output-len", str(args.output_len), "--rate", args.rate, "--seed", str(args.seed)],
                                server_args, Path(scratch) / f"{mode}-{repeat}")
                summary = run["summary"]
                result = {"mode": mode, "completed": summary["completed"], "failed": summary["failed"],
                          "ttft_p99_ms": summary["ttft_ms"]["p99"], "ttft_median_ms": summary["ttft_ms"]["median"],
                          "tpot_p99_ms": summary["tpot_ms"]["p99"], "tpot_median_ms": summary["tpot_ms"]["median"],
                          "output_tokens_per_s": summary["output_throughput"], "duration_s": summary["duration_s"]}
                runs[mode].append(result)
                print(f"[{repeat}] {mode}: p99 TTFT {result['ttft_p99_ms']:.0f} ms, p99 TPOT "
                      f"{result['tpot_p99_ms']:.1f} ms, {result['output_tokens_per_s']:.0f} output tok/s", flush=True)

    middle = medians(runs, ("ttft_p99_ms", "tpot_p99_ms", "ttft_median_ms", "tpot_median_ms",
                            "output_tokens_per_s"))
    ttft_gain = middle["recompute"]["ttft_p99_ms"] / middle["swap"]["ttft_p99_ms"]
    tpot_gain = middle["recompute"]["tpot_p99_ms"] / middle["swap"]["tpot_p99_ms"]
    result = result_header(
        "swap_preemption",
        "fitserve bench (synthetic) against fitserve serve with --preemption-mode recompute and swap, "
        "alternating, same seed, bundled model, small KV cache", args) | {
        "runs": runs,
        "medians": middle,
        "ttft_p99_recompute_over_swap": ttft_gain,
        "tpot_p99_recompute_over_swap": tpot_gain,
        "targets": {"at_least": 1.4, "met": ttft_gain >= 1.4 and tpot_gain >= 1.4},
    }
    path = write_result("swap_preemption", result, args.out)
    print(f"p99 TTFT recompute/swap = {ttft_gain:.2f}, p99 TPOT recompute/swap = {tpot_gain:.2f} "
          f"(target >= 1.4 each); wrote {path}")


if __name__ == "__main__":
    main()

"""Swap against recompute preemption under memory pressure, side by side, same requests.

A KV cache far too small for the requests in flight (`--kv-cache-memory 8MiB`: about 1,300
tokens of the bundled model, for prompts of 200 tokens that generate 200) forces many
preemptions. With recompute, a preempted request computes its prompt and output again; with
swap, its KV goes to host memory and back. Each repetition runs `fitserve bench` once per
mode (alternating; same seed, so the same prompts at the same times). Modes:

  recompute                 --preemption-mode recompute
  swap                      --preemption-mode swap (the host tier also caches prefixes)
  swap-no-host-cache        --preemption-mode swap --no-host-prefix-cache

Target (issue 22): swap's p99 TTFT and p99 TPOT at least 1.4x better than recompute's.
`--server-args --no-enable-prefix-caching` measures without the prefix cache, which
otherwise lets recompute reuse a preempted request's own still-cached blocks. With
`--workload multi-turn` (conversations that carry their history, turns back to back), the
swap / swap-no-host-cache pair shows what the host tier of the prefix cache buys.

    python benchmarks/swap_preemption.py                 # writes results/swap_preemption.json
    python benchmarks/swap_preemption.py --modes swap,swap-no-host-cache --workload multi-turn
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, quantized_checkpoint, random_checkpoint, synthetic_tokenizer, write_result  # noqa: E402
from side_by_side import bench_run, medians, result_header  # noqa: E402

MODES = {
    "recompute": "--preemption-mode recompute",
    "swap": "--preemption-mode swap",
    "swap-no-host-cache": "--preemption-mode swap --no-host-prefix-cache",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="recompute,swap",
                        help=f"comma-separated, first is the baseline: {', '.join(MODES)}")
    parser.add_argument("--workload", default="synthetic", choices=["synthetic", "multi-turn"])
    parser.add_argument("--num-turns", type=int, default=3, help="multi-turn: turns per conversation")
    parser.add_argument("--kv-cache-memory", default="8MiB")
    parser.add_argument("--num-requests", type=int, default=48)
    parser.add_argument("--input-len", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=200)
    parser.add_argument("--len-dist", default="fixed", choices=["fixed", "uniform", "normal"],
                        help="distribution of input and output lengths around their means (fitserve bench's)")
    parser.add_argument("--len-spread", type=float, default=0.25,
                        help="uniform: half-width, normal: standard deviation, as a fraction of the mean")
    parser.add_argument("--rate", default="4", help="requests/s (inf: all at once)")
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--server-args", default="")
    parser.add_argument("--preset", default=None,
                        help="serve a random-weight model with this preset's shapes (e.g. qwen2.5-0.5b) "
                             "instead of the bundled model: prompt tokens cost what they cost in a real model")
    parser.add_argument("--weights", default="bfloat16", choices=["bfloat16", "w8", "w4", "mixllm"],
                        help="with --preset: serve the random checkpoint as stored (bfloat16) or quantized by "
                             "`fitserve quantize` in this format (a decode step then reads a quarter of the bytes, "
                             "while a recomputed prompt token costs what it did)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "swap_preemption.json")
    parser.add_argument("--note", default="", help="stored in the result: e.g. what else the machine was running")
    args = parser.parse_args()
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or len(modes) < 2:
        parser.error(f"--modes needs two or more of {', '.join(MODES)} (got {args.modes!r})")

    model_args, tokenizer_args = [], ""
    if args.weights != "bfloat16" and not args.preset:
        parser.error("--weights needs --preset (the bundled model is served as stored)")
    if args.preset:
        model_dir = random_checkpoint(args.preset, "bfloat16")
        if args.weights != "bfloat16":
            model_dir = quantized_checkpoint(model_dir, args.weights)
        tokenizer = synthetic_tokenizer(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        model_args, tokenizer_args = ["--model", str(model_dir), "--tokenizer", str(tokenizer)], f"--tokenizer {tokenizer}"
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    with tempfile.TemporaryDirectory(prefix="swap-preemption-") as scratch:
        for repeat in range(args.repeats):
            for mode in modes:
                server_args = (f"{MODES[mode]} --kv-cache-memory {args.kv_cache_memory} "
                               f"--max-num-seqs {args.max_num_seqs} {tokenizer_args} {args.server_args}").strip()
                run = bench_run([*model_args, "--workload", args.workload, "--num-turns", str(args.num_turns),
                                 "--num-requests", str(args.num_requests), "--input-len", str(args.input_len),
                                 "--output-len", str(args.output_len),
                                 "--input-len-dist", args.len_dist, "--input-len-spread", str(args.len_spread),
                                 "--output-len-dist", args.len_dist, "--output-len-spread", str(args.len_spread),
                                 "--rate", args.rate, "--seed", str(args.seed)],
                                server_args, Path(scratch) / f"{mode}-{repeat}")
                summary = run["summary"]
                counters = run["server_counters"] or {}
                result = {"mode": mode, "completed": summary["completed"], "failed": summary["failed"],
                          "ttft_p99_ms": summary["ttft_ms"]["p99"], "ttft_median_ms": summary["ttft_ms"]["median"],
                          "tpot_p99_ms": summary["tpot_ms"]["p99"], "tpot_median_ms": summary["tpot_ms"]["median"],
                          "output_tokens_per_s": summary["output_throughput"], "duration_s": summary["duration_s"],
                          "preemptions": counters.get("fitserve_num_preemptions_total"),
                          "recomputed_tokens": counters.get("fitserve_recomputed_tokens_total"),
                          "computed_tokens": counters.get("fitserve_computed_tokens_total"),
                          "server_counters": counters}
                runs[mode].append(result)
                print(f"[{repeat}] {mode}: p99 TTFT {result['ttft_p99_ms']:.0f} ms, p99 TPOT "
                      f"{result['tpot_p99_ms']:.1f} ms, {result['output_tokens_per_s']:.0f} output tok/s, "
                      f"{result['preemptions']} preemptions, {result['recomputed_tokens']} of "
                      f"{result['computed_tokens']} computed tokens recomputed", flush=True)

    middle = medians(runs, ("ttft_p99_ms", "tpot_p99_ms", "ttft_median_ms", "tpot_median_ms",
                            "output_tokens_per_s"))
    baseline = modes[0]
    gains = {mode: {"ttft_p99": middle[baseline]["ttft_p99_ms"] / middle[mode]["ttft_p99_ms"],
                    "tpot_p99": middle[baseline]["tpot_p99_ms"] / middle[mode]["tpot_p99_ms"]}
             for mode in modes[1:]}
    # On a shared machine the load drifts between repetitions far more than within one, so
    # the ratio of the runs made next to each other is the steadier estimate.
    paired = {mode: {metric: statistics.median(base[f"{metric}_ms"] / run[f"{metric}_ms"]
                                               for base, run in zip(runs[baseline], runs[mode]))
                     for metric in ("ttft_p99", "tpot_p99")}
              for mode in modes[1:]}
    result = result_header(
        "swap_preemption",
        "fitserve bench against fitserve serve with each preemption mode, alternating, same seed, "
        + (f"random-weight {args.preset}-shaped model, {args.weights} weights" if args.preset else "bundled model") + ", small KV cache", args) | {
        "command": shlex.join(["python", "benchmarks/swap_preemption.py", *sys.argv[1:]]),
        "note": args.note,
        "runs": runs,
        "medians": middle,
        f"p99_{baseline}_over_mode": gains,
        f"p99_{baseline}_over_mode_paired": paired,
    }
    if "swap" in gains and baseline == "recompute":
        result["targets"] = {"swap_at_least": 1.4, "met": min(gains["swap"].values()) >= 1.4,
                             "met_paired": min(paired["swap"].values()) >= 1.4}
    path = write_result("swap_preemption", result, args.out)
    for mode, gain in gains.items():
        print(f"{baseline}/{mode}: p99 TTFT {gain['ttft_p99']:.2f}, p99 TPOT {gain['tpot_p99']:.2f} (medians); "
              f"{paired[mode]['ttft_p99']:.2f}, {paired[mode]['tpot_p99']:.2f} (median of paired runs)")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Swap against recompute preemption in seconds instead of minutes: fitserve's own scheduler
and KV-cache manager driven by a step-cost model, no model and no server.

Each step runs `Scheduler.schedule` / `update_from_output` exactly as the engine does; only
the step's duration is modelled: `decode_step_ms + decode_row_ms x rows` when it has decode
rows, plus `prefill_ms_per_token x prompt tokens` (recomputation included), plus the swap-out
copy at `copy_gb_per_s`. A swap-in lands one step later, as the engine's worker-thread copy
does. Lengths and arrival times are drawn the way `fitserve bench` draws them for the same
seed, so a configuration can be screened here before `swap_preemption.py` measures it.

The default costs were measured on one core of a Zen 4 VM (Qwen2.5-0.5B's shape, bfloat16,
`--num-threads 1`): a 1,024-token prefill took 4.3 s, decode steps 36 / 50 / 82 ms at 1 / 4 / 8
rows. `--costs w4` uses the same shape quantized to w4 (`swap_preemption.py --weights w4`),
measured the same way: 4.1 ms per prompt token, decode steps 13 / 20 / 32 / 67 ms at 1 / 4 / 8 /
16 rows. A quantized decode step reads a quarter of the bytes while a prompt token costs what
it did, so recomputation weighs about three times as much against the decode steps. On the
workload of `swap_preemption_qwen2.5-0.5b_pressure.json` the model's run times and preemption
counts were within about 10% of the measured ones; its latencies are lower (no HTTP, no engine
overhead) and its swap/recompute ratios somewhat higher. It is a screen, not a measurement.

    python benchmarks/swap_schedule_model.py --num-requests 32 --input-len 64 --output-len 192 \\
        --len-dist uniform --len-spread 0.33 --kv-cache-memory 20MiB --rate 1 --max-num-seqs 32
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import dataclass, replace

import numpy as np

from fitserve.bench.arrivals import arrival_offsets
from fitserve.bench.workload import LengthSpec
from fitserve.config import parse_size
from fitserve.engine.kv_cache import KVCacheManager
from fitserve.engine.request import Request, RequestStatus
from fitserve.engine.scheduler import Scheduler
from fitserve.sampling_params import SamplingParams

BLOCK_SIZE = 16


@dataclass
class StepCosts:
    prefill_ms_per_token: float = 4.2
    decode_step_ms: float = 30.0
    decode_row_ms: float = 6.5
    copy_gb_per_s: float = 5.0

    def seconds(self, num_prefill_tokens: int, num_decode_rows: int, num_copied_bytes: int) -> float:
        decode = self.decode_step_ms + self.decode_row_ms * num_decode_rows if num_decode_rows else 0.0
        compute = decode + self.prefill_ms_per_token * num_prefill_tokens
        return compute / 1e3 + num_copied_bytes / (self.copy_gb_per_s * 1e9)


COST_PRESETS = {
    "bfloat16": StepCosts(),
    "w4": StepCosts(prefill_ms_per_token=4.1, decode_step_ms=11.0, decode_row_ms=3.5),
}


def simulate(args: argparse.Namespace, mode: str, seed: int, costs: StepCosts) -> dict[str, float]:
    """One run of the workload under `mode` ("recompute" or "swap"); p99 TTFT / TPOT in seconds."""
    rng = np.random.default_rng([seed, 1])
    prompt_lens = LengthSpec(args.input_len, args.len_dist, args.len_spread).sample(rng, args.num_requests)
    output_lens = LengthSpec(args.output_len, args.len_dist, args.len_spread).sample(rng, args.num_requests)
    arrivals = arrival_offsets(args.num_requests, args.rate, 1.0, np.random.default_rng([seed, 2]))
    block_bytes = BLOCK_SIZE * args.kv_bytes_per_token
    num_host_blocks = parse_size(args.swap_space) // block_bytes if mode == "swap" else 0
    kv_cache = KVCacheManager(parse_size(args.kv_cache_memory) // block_bytes, BLOCK_SIZE, not args.no_prefix_caching,
                              num_host_blocks=num_host_blocks)
    scheduler = Scheduler(kv_cache, args.max_num_batched_tokens, args.max_num_seqs, preemption_mode=mode)
    tokens = np.random.default_rng([seed, 3])
    requests = [Request(f"r{index}", tokens.integers(1000, 100_000, prompt_len).tolist(),
                        SamplingParams(max_tokens=output_len, ignore_eos=True), arrival_time=float(arrival))
                for index, (prompt_len, output_len, arrival) in enumerate(zip(prompt_lens, output_lens, arrivals))]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    now, arrived, finished, swapping_in = 0.0, 0, 0, []
    while finished < len(requests):
        while arrived < len(requests) and arrivals[arrived] <= now:
            scheduler.add_request(requests[arrived])
            arrived += 1
        scheduler.finish_swap_in([request.request_id for request in swapping_in])
        output = scheduler.schedule()
        swapping_in = [request for request, _ in output.swap_in]
        if output.is_empty:
            if not swapping_in and arrived < len(requests):
                now = max(now, float(arrivals[arrived]))
            continue
        rows = sum(1 for item in output.scheduled if item.num_new_tokens == 1 and item.completes_sequence
                   and item.request.num_output_tokens > 0)
        copied = sum(count for _, groups in output.swap_out for _, _, count in groups) * block_bytes
        now += costs.seconds(output.num_batched_tokens - rows, rows, copied)
        scheduler.update_from_output(output)
        for item in output.scheduled:
            request = item.request
            if request.num_computed_tokens < request.num_tokens:
                continue  # a prompt chunk: no token yet
            request.output_token_ids.append(7)
            first.setdefault(request.request_id, now)
            last[request.request_id] = now
            if request.num_output_tokens >= request.max_output_tokens:
                scheduler.finish_request(request, RequestStatus.FINISHED_LENGTH)
                finished += 1
    ttft = [first[r.request_id] - r.arrival_time for r in requests]
    tpot = [(last[r.request_id] - first[r.request_id]) / (r.num_output_tokens - 1)
            for r in requests if r.num_output_tokens > 1]
    return {"ttft_p99": float(np.percentile(ttft, 99)), "tpot_p99": float(np.percentile(tpot, 99)),
            "duration": now, "preemptions": scheduler.num_preemptions_total,
            "recomputed_tokens": scheduler.num_recomputed_tokens_total,
            "computed_tokens": scheduler.num_computed_tokens_total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=192)
    parser.add_argument("--len-dist", default="uniform", choices=["fixed", "uniform", "normal"])
    parser.add_argument("--len-spread", type=float, default=0.33)
    parser.add_argument("--rate", type=float, default=1.0, help="requests/s (inf: all at once)")
    parser.add_argument("--kv-cache-memory", default="20MiB")
    parser.add_argument("--swap-space", default="4GiB")
    parser.add_argument("--kv-bytes-per-token", type=int, default=24 * 2 * 2 * 64 * 2,
                        help="K and V bytes per token (default: Qwen2.5-0.5B in bfloat16)")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--max-num-batched-tokens", type=int, default=2048)
    parser.add_argument("--no-prefix-caching", action="store_true")
    parser.add_argument("--seeds", type=int, default=6, help="seeds 0..N-1 (the benchmark's default seed is 0)")
    parser.add_argument("--costs", default="bfloat16", choices=sorted(COST_PRESETS),
                        help="measured step costs of the weights (the flags below override single values)")
    parser.add_argument("--prefill-ms-per-token", type=float, default=None)
    parser.add_argument("--decode-step-ms", type=float, default=None)
    parser.add_argument("--decode-row-ms", type=float, default=None)
    args = parser.parse_args()
    overrides = {name: getattr(args, name) for name in ("prefill_ms_per_token", "decode_step_ms", "decode_row_ms")
                 if getattr(args, name) is not None}
    costs = replace(COST_PRESETS[args.costs], **overrides)
    ratios = []
    for seed in range(args.seeds):
        recompute, swap = (simulate(args, mode, seed, costs) for mode in ("recompute", "swap"))
        ratios.append((recompute["ttft_p99"] / swap["ttft_p99"], recompute["tpot_p99"] / swap["tpot_p99"]))
        print(f"seed {seed}: recompute/swap p99 TTFT {ratios[-1][0]:.2f}, p99 TPOT {ratios[-1][1]:.2f}; run "
              f"{recompute['duration']:.0f} / {swap['duration']:.0f} s, preemptions {recompute['preemptions']} / "
              f"{swap['preemptions']}, recomputed {recompute['recomputed_tokens']} of "
              f"{recompute['computed_tokens']} tokens")
    print(f"median over seeds: p99 TTFT {statistics.median(r[0] for r in ratios):.2f}, "
          f"p99 TPOT {statistics.median(r[1] for r in ratios):.2f}")


if __name__ == "__main__":
    main()

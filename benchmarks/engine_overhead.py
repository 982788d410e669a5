"""Host time of one engine decode step with many running requests, on the GPU path's route.

On a GPU, everything the engine does outside the model (scheduling, filling the CUDA graphs'
input buffers, sampling, recording tokens) happens while the GPU waits, so at a few hundred
running requests it competes with the step itself. None of it depends on the device, so it is
measured here on the CPU: a tiny model (the forward is timed and left out), decode steps
routed through the static buffers CUDA graphs replay (run eagerly), and two ways of asking for
results side by side: the offline one (`LLM.generate`: a request is reported once, finished)
and the serving one (every request reported every step, as a stream needs).

    python benchmarks/engine_overhead.py                    # 256 running requests
    python benchmarks/engine_overhead.py --num-requests 64
    python benchmarks/engine_overhead.py --policies fcfs,vtc   # scheduling policies side by side

With `--policies`, the offline route is measured once per policy per repeat, alternating, the
requests spread over 4 clients (what vtc shares between), and the result goes to
engine_overhead_policies_<N>.json with each policy's host time relative to the first's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, write_result  # noqa: E402

TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 32, "vocab_size": 512, "max_position_embeddings": 4096}


def build_engine(model_dir: Path, num_requests: int):
    from fitserve import LLM
    from fitserve.engine.decode_graphs import DecodeGraphs
    from fitserve.engine.runner import allocate_kv_cache

    engine = LLM(str(model_dir), dtype="float32", kv_cache_memory="256MiB", max_num_seqs=num_requests,
                 max_num_batched_tokens=8192, seed=0).engine
    config = engine.model_config
    kv_caches = allocate_kv_cache(config.num_hidden_layers, engine.num_kv_blocks + 1, engine.block_size,
                                  config.num_key_value_heads, config.head_dim, engine.dtype, engine.device)
    engine.runner.kv_caches = kv_caches
    engine.runner.decode_graphs = DecodeGraphs(
        engine.model, kv_caches, engine.block_size, engine.max_model_len, num_requests,
        padding_block=engine.num_kv_blocks, device=engine.device, use_cuda_graphs=False,
    )
    return engine


NUM_CLIENTS = 4


def measure(engine, num_requests: int, final_output_only: bool, steps: int, tag: str = "") -> dict:
    """Milliseconds per decode step: total, forward, and the host-side phases."""
    from fitserve import SamplingParams

    generator = torch.Generator().manual_seed(0)
    for index in range(num_requests):
        prompt = torch.randint(3, TINY["vocab_size"], (100 + index % 200,), generator=generator).tolist()
        engine.add_request(f"{tag}{final_output_only}-{index}", {"prompt_token_ids": prompt},
                           SamplingParams(max_tokens=steps + 64, ignore_eos=True),
                           final_output_only=final_output_only, client_id=f"client-{index % NUM_CLIENTS}")
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine._requests.values()):
        engine.step()  # prefill

    spent: Counter = Counter()
    originals = []

    def timed(owner, name: str, key: str) -> None:
        original = getattr(owner, name)
        originals.append((owner, name, original))

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start
        setattr(owner, name, wrapper)

    graphs = engine.runner.decode_graphs
    timed(engine.scheduler, "schedule", "schedule")
    timed(engine.runner, "execute", "execute")
    timed(engine.runner, "_sample", "sample")
    timed(graphs, "run", "buffers_and_forward")
    timed(graphs, "_forward", "forward")
    timed(engine, "_update", "update")
    step_times = []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - start)
    for owner, name, original in reversed(originals):
        setattr(owner, name, original)
    for request_id in list(engine._requests):
        engine.abort_request(request_id)
    engine.step()

    per_step = {key: value / steps * 1e3 for key, value in spent.items()}
    total = sum(step_times) / steps * 1e3
    return {
        "step_ms": total,
        "step_ms_median": statistics.median(step_times) * 1e3,
        "forward_ms": per_step["forward"],
        "host_ms": total - per_step["forward"],
        "parts_ms": {
            "schedule": per_step["schedule"],
            "static_buffers": per_step["buffers_and_forward"] - per_step["forward"],
            "sample": per_step["sample"],
            "runner_other": per_step["execute"] - per_step["buffers_and_forward"] - per_step["sample"],
            "update_and_outputs": per_step["update"],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--policies", default=None, metavar="P[,P...]",
                        help="compare scheduling policies (e.g. fcfs,vtc) on the offline route instead")
    args = parser.parse_args()
    if args.policies:
        return compare_policies(args, args.policies.split(","))

    from fitserve.models.random_checkpoint import write_random_checkpoint

    with tempfile.TemporaryDirectory() as directory:
        model_dir = write_random_checkpoint(Path(directory) / "tiny", "qwen3-0.6b", dtype="float32",
                                            seed=0, overrides=TINY)
        engine = build_engine(model_dir, args.num_requests)
        measure(engine, args.num_requests, True, 10)  # warm-up
        runs: dict[str, list[dict]] = {"offline": [], "streaming": []}
        for _ in range(args.repeats):  # the two routes alternate
            runs["offline"].append(measure(engine, args.num_requests, True, args.steps))
            runs["streaming"].append(measure(engine, args.num_requests, False, args.steps))

    summary = {}
    for route, results in runs.items():
        summary[route] = {
            "host_ms": statistics.median(r["host_ms"] for r in results),
            "parts_ms": {part: statistics.median(r["parts_ms"][part] for r in results)
                         for part in results[0]["parts_ms"]},
        }
        parts = ", ".join(f"{k} {v:.2f}" for k, v in summary[route]["parts_ms"].items())
        print(f"{route:>9}: host {summary[route]['host_ms']:.2f} ms per step at {args.num_requests} "
              f"running requests ({parts})")
    result = {"benchmark": "engine_overhead", "machine": describe_machine(), "num_requests": args.num_requests,
              "steps": args.steps, "model": {"preset": "qwen3-0.6b", "overrides": TINY},
              "route": "decode through the CUDA graphs' static buffers, run eagerly on the CPU",
              "summary": summary, "runs": runs}
    path = write_result(f"engine_overhead_{args.num_requests}", result, args.out)
    print(f"wrote {path}")
    return 0


def compare_policies(args: argparse.Namespace, policies: list[str]) -> int:
    """Host time per decode step under each policy, alternating within every repeat."""
    from fitserve.engine.policy import make_policy
    from fitserve.models.random_checkpoint import write_random_checkpoint

    runs: dict[str, list[dict]] = {policy: [] for policy in policies}
    with tempfile.TemporaryDirectory() as directory:
        model_dir = write_random_checkpoint(Path(directory) / "tiny", "qwen3-0.6b", dtype="float32",
                                            seed=0, overrides=TINY)
        engine = build_engine(model_dir, args.num_requests)
        measure(engine, args.num_requests, True, 10, "warm-")
        for repeat in range(args.repeats):
            for policy in policies:
                engine.scheduler.policy = make_policy(policy)  # the scheduler is empty between runs
                runs[policy].append(measure(engine, args.num_requests, True, args.steps, f"{policy}{repeat}-"))
    summary = {policy: {"host_ms": statistics.median(r["host_ms"] for r in results),
                        "schedule_ms": statistics.median(r["parts_ms"]["schedule"] for r in results),
                        "update_ms": statistics.median(r["parts_ms"]["update_and_outputs"] for r in results)}
               for policy, results in runs.items()}
    base = summary[policies[0]]["host_ms"]
    for policy in policies:
        summary[policy]["host_relative_to_first"] = summary[policy]["host_ms"] / base
        print(f"{policy:>9}: host {summary[policy]['host_ms']:.2f} ms per step at {args.num_requests} running "
              f"requests (schedule {summary[policy]['schedule_ms']:.2f}, update {summary[policy]['update_ms']:.2f}), "
              f"{summary[policy]['host_relative_to_first']:.3f}x {policies[0]}")
    result = {"benchmark": "engine_overhead_policies", "machine": describe_machine(),
              "num_requests": args.num_requests, "steps": args.steps, "repeats": args.repeats,
              "num_clients": NUM_CLIENTS, "model": {"preset": "qwen3-0.6b", "overrides": TINY},
              "route": "offline (final outputs only), decode through the CUDA graphs' static buffers, eager on CPU",
              "summary": summary, "runs": runs}
    path = write_result(f"engine_overhead_policies_{args.num_requests}", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

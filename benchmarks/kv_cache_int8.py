"""The int8 KV cache against the bfloat16 cache on the CPU, side by side in one run.

Sections (each can be skipped with --sections):
  attention  decode attention of one sequence per layer at 2048 and 8192 positions, the CPU
             kernel over an int8 cache vs over a bf16 cache (bf16 queries), with a read of
             one layer's weight bytes between layers (in a decode step the weights stream
             through the caches between two layers' attention, so K/V come from memory);
             the two caches alternate layer by layer.
  single     single-stream decode at a 4096-token context through the whole engine (random
             weights of a real model's shape, bf16): two engines, one per cache, prefilled
             with the same prompt, then their decode steps alternate one by one (at 1 and
             at 2 threads: on a machine shared with other busy processes, two threads spend
             most of a step waiting for each other at the barriers, which hides the caches'
             difference).
  capacity   32 concurrent requests with long prompts, the same --kv-cache-memory for both
             caches (the bundled model in bf16): the most requests running at once, the
             preemptions, and the wall time.

    python benchmarks/kv_cache_int8.py                       # everything
    python benchmarks/kv_cache_int8.py --sections attention  # one section

Writes benchmarks/results/kv_cache_int8.json (or --out). The machine may be shared: the
ratios (same run, alternating) are the numbers to quote, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, random_checkpoint, write_result  # noqa: E402

from fitserve import LLM, SamplingParams  # noqa: E402
from fitserve.attention.cache_layout import quantize_int8  # noqa: E402
from fitserve.bench.roofline import ModelShape  # noqa: E402
from fitserve.kernels import cpu  # noqa: E402
from fitserve.models.random_checkpoint import PRESETS  # noqa: E402

CACHES = ("bf16", "int8")


def attention_section(args) -> dict:
    kernels = cpu.get()
    assert kernels is not None, "the CPU kernels are unavailable here"
    results = []
    threads_before = torch.get_num_threads()
    for threads in args.attention_threads:
        torch.set_num_threads(threads)
        results.extend(_attention_rows(args, kernels, threads))
    torch.set_num_threads(threads_before)
    return {"avx512_bf16": bool(kernels.has_avx512_bf16()), "results": results}


def _attention_rows(args, kernels, threads: int) -> list[dict]:
    results = []
    for preset in args.presets:
        shape = ModelShape.from_config(PRESETS[preset], torch.bfloat16)
        heads, kv_heads, head_dim, layers = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_layers
        flush = torch.ones(2, min(shape.layer_matmul_params * 2, 64 << 20) // 4)
        for context in args.contexts:
            block_size = 16
            blocks = -(-context // block_size)
            # The sequence's blocks scattered over a cache twice its size, as a busy cache is.
            table = torch.randperm(2 * blocks)[:blocks].to(torch.int32).view(1, -1)
            shape_kv = (2 * blocks, block_size, kv_heads, head_dim)
            caches: dict[str, list[tuple]] = {"bf16": [], "int8": []}
            for _ in range(layers):
                keys, values = torch.randn(shape_kv), torch.randn(shape_kv)
                caches["bf16"].append((keys.to(torch.bfloat16), values.to(torch.bfloat16), None, None))
                (key_values, key_scales), (value_values, value_scales) = quantize_int8(keys), quantize_int8(values)
                caches["int8"].append((key_values, value_values, key_scales, value_scales))
                del keys, values
            query = torch.randn(1, heads, head_dim).to(torch.bfloat16)
            out = torch.empty_like(query)
            lengths = torch.tensor([context], dtype=torch.int32)
            rows = torch.zeros(1, dtype=torch.long)
            scale = head_dim**-0.5
            seconds = {name: [] for name in CACHES}
            for sweep in range(args.attention_sweeps):
                for layer in range(layers):
                    for name in (CACHES if (layer + sweep) % 2 == 0 else CACHES[::-1]):
                        key_cache, value_cache, key_scales, value_scales = caches[name][layer]
                        flush[layer % 2].sum()
                        start = time.perf_counter()
                        kernels.paged_decode_attention(query, key_cache, value_cache, table, lengths, rows, out, scale,
                                                       key_scales, value_scales)
                        seconds[name].append(time.perf_counter() - start)
            row = {"preset": preset, "context": context, "threads": threads, "heads": heads, "kv_heads": kv_heads,
                   "head_dim": head_dim, "layers": layers, "calls_per_cache": len(seconds["bf16"])}
            for name in CACHES:
                row[name] = {"us_per_layer_median": statistics.median(seconds[name]) * 1e6,
                             "us_per_layer_mean": statistics.fmean(seconds[name]) * 1e6}
            row["int8_time_over_bf16"] = row["int8"]["us_per_layer_median"] / row["bf16"]["us_per_layer_median"]
            results.append(row)
            print(preset, context, f"{threads} thread(s)",
                  {name: round(row[name]["us_per_layer_median"], 1) for name in CACHES},
                  f"int8/bf16 time x{row['int8_time_over_bf16']:.3f}", flush=True)
            del caches
    return results


def _engine(model_dir: Path | None, kv_cache_dtype: str, **extra) -> LLM:
    return LLM(None if model_dir is None else str(model_dir), dtype="bfloat16", kv_cache_dtype=kv_cache_dtype,
               **extra)


def single_section(args) -> dict:
    model_dir = random_checkpoint(args.single_preset, "bfloat16", args.num_layers)
    llms = {name: _engine(model_dir, "int8" if name == "int8" else "auto", kv_cache_memory="256MiB",
                          max_model_len=args.context + args.decode_tokens * len(args.single_threads) + 8)
            for name in CACHES}
    prompt = torch.randint(3, 1000, (args.context,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(temperature=0, max_tokens=args.decode_tokens * len(args.single_threads) + 1,
                            ignore_eos=True)
    for llm in llms.values():  # prefill (not timed): the context to decode at
        llm.engine.add_request("r", {"prompt_token_ids": prompt}, params)
        while not _prefilled(llm):
            llm.engine.step()
    rows = []
    threads_before = torch.get_num_threads()
    for threads in args.single_threads:
        torch.set_num_threads(threads)
        seconds = {name: [] for name in CACHES}
        for step in range(args.decode_tokens):
            for name in (CACHES if step % 2 == 0 else CACHES[::-1]):
                start = time.perf_counter()
                llms[name].engine.step()
                seconds[name].append(time.perf_counter() - start)
        row = {"preset": args.single_preset, "num_layers": args.num_layers, "context": args.context,
               "threads": threads, "decode_steps": args.decode_tokens}
        for name in CACHES:
            median = statistics.median(seconds[name])
            row[name] = {"step_ms_median": median * 1e3, "step_ms_min": min(seconds[name]) * 1e3,
                         "tokens_per_s": 1 / median}
        row["int8_tokens_per_s_over_bf16"] = row["int8"]["tokens_per_s"] / row["bf16"]["tokens_per_s"]
        print("single", f"{threads} thread(s)", {name: round(row[name]["tokens_per_s"], 2) for name in CACHES},
              f"int8/bf16 tokens/s x{row['int8_tokens_per_s_over_bf16']:.3f}", flush=True)
        rows.append(row)
    torch.set_num_threads(threads_before)
    return {"results": rows}


def _prefilled(llm: LLM) -> bool:
    """Whether the engine's one request has its prompt computed (it is decoding now)."""
    running = llm.engine.scheduler.running
    return bool(running) and running[0].num_computed_tokens >= running[0].num_prompt_tokens


def capacity_section(args) -> dict:
    prompts = [torch.randint(3, 4000, (args.capacity_prompt_tokens,),
                             generator=torch.Generator().manual_seed(i)).tolist()
               for i in range(args.capacity_requests)]
    params = SamplingParams(temperature=0, max_tokens=args.capacity_output_tokens, ignore_eos=True)
    row = {"model": "fitserve-tiny (bundled), bf16 weights", "requests": args.capacity_requests,
           "prompt_tokens": args.capacity_prompt_tokens, "output_tokens": args.capacity_output_tokens,
           "kv_cache_memory": args.capacity_memory}
    for name in CACHES:
        llm = _engine(None, "int8" if name == "int8" else "auto", kv_cache_memory=args.capacity_memory,
                      max_num_seqs=args.capacity_requests, enable_prefix_caching=False)
        engine = llm.engine
        for index, prompt in enumerate(prompts):
            engine.add_request(str(index), {"prompt_token_ids": prompt}, params)
        most_running = most_before_preemption = 0
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
            stats = engine.get_stats()
            most_running = max(most_running, stats.num_running)
            if stats.num_preemptions_total == 0:
                most_before_preemption = most_running
        stats = engine.get_stats()
        row[name] = {"kv_capacity_tokens": engine.kv_capacity_tokens, "most_running": most_running,
                     "most_running_before_first_preemption": most_before_preemption,
                     "preemptions": stats.num_preemptions_total, "wall_s": time.perf_counter() - start,
                     "generated_tokens": stats.num_generated_tokens_total}
        print("capacity", name, row[name], flush=True)
        del llm, engine
    row["int8_over_bf16_capacity"] = row["int8"]["kv_capacity_tokens"] / row["bf16"]["kv_capacity_tokens"]
    row["int8_over_bf16_most_running"] = row["int8"]["most_running"] / max(1, row["bf16"]["most_running"])
    row["int8_over_bf16_running_before_preemption"] = (
        row["int8"]["most_running_before_first_preemption"]
        / max(1, row["bf16"]["most_running_before_first_preemption"])
    )
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", choices=["attention", "single", "capacity"],
                        default=["attention", "single", "capacity"])
    parser.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"], choices=sorted(PRESETS),
                        help="model shapes of the attention section")
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--attention-sweeps", type=int, default=6, help="passes over the layers per context")
    parser.add_argument("--attention-threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts of the attention section (one sequence: 1 shows the kernel, 2 the "
                             "engine's default on this machine)")
    parser.add_argument("--single-preset", default="qwen2.5-0.5b", choices=sorted(PRESETS))
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers for the single section")
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--decode-tokens", type=int, default=40, help="timed steps per cache and thread count")
    parser.add_argument("--single-threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts of the single section (the engines decode on, one after the other)")
    parser.add_argument("--capacity-requests", type=int, default=32)
    parser.add_argument("--capacity-prompt-tokens", type=int, default=1536)
    parser.add_argument("--capacity-output-tokens", type=int, default=16)
    parser.add_argument("--capacity-memory", default="24MiB")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    body: dict = {}
    sections = {"attention": attention_section, "single": single_section, "capacity": capacity_section}
    for name in args.sections:
        body[name] = sections[name](args)
    write_result("kv_cache_int8", {"benchmark": "kv_cache_int8", "machine": describe_machine(),
                                   "note": "shared machine (other agents running): compare the ratios", **body},
                 args.out or Path(__file__).resolve().parent / "results" / "kv_cache_int8.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

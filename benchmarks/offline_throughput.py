"""Offline batch throughput: fitserve's `LLM.generate` vs transformers' `generate`, same run.

Random weights with the shape of a real model (speed does not depend on weight values), a
fixed-seed workload of token-id prompts with random input/output lengths, EOS ignored so both
systems produce exactly the requested tokens. transformers runs in padded batches grouped by
output length, so that a batch's short requests wait as little as possible for its longest
(its best offline setting); its output-token count is the requested tokens, not the padding
it also computes. With several `--hf-batch-size` values each is run and the ratio is taken
against the best. Both systems first run a few untimed requests (kernel compilation, CUDA
context, allocator). Systems alternate within each repetition; the JSON has every run and is
rewritten after each one, so a run cut short still leaves what it measured.

    python benchmarks/offline_throughput.py                      # Qwen2.5-0.5B shape, bf16, 64 prompts
    python benchmarks/offline_throughput.py --num-prompts 16 --repeats 1 --preset qwen3-0.6b

On a GPU, nano-vllm's recipe (256 requests, input and output lengths uniform in 100–1024):

    python benchmarks/offline_throughput.py --device cuda --preset qwen3-0.6b --num-prompts 256 \
        --input-len 100 1024 --output-len 100 1024 --hf-batch-size 128 256

There transformers' step time hardly grows with the batch, and its batches of 64 / 128 / 256
take 2659 / 1569 / 1022 decode steps for this workload, so the larger sizes are its best; a
size whose cache cannot fit in the GPU memory that fitserve leaves (--gpu-memory-utilization)
is skipped and named in the JSON.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, random_checkpoint, summarize, write_result  # noqa: E402


def make_workload(num_prompts: int, input_range: tuple[int, int], output_range: tuple[int, int],
                  vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    workload = []
    for _ in range(num_prompts):
        input_len = rng.randint(*input_range)
        output_len = rng.randint(*output_range)
        workload.append(([rng.randrange(10, vocab_size) for _ in range(input_len)], output_len))
    return workload


def run_fitserve(llm, workload: list[tuple[list[int], int]]) -> tuple[float, int]:
    from fitserve import SamplingParams

    prompts = [{"prompt_token_ids": ids} for ids, _ in workload]
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for _, n in workload]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    assert produced == sum(n for _, n in workload)
    return elapsed, produced


def warmup_workload(workload: list[tuple[list[int], int]], count: int) -> list[tuple[list[int], int]]:
    """The first `count` prompts with 8 output tokens each: enough to compile and allocate."""
    return [(ids, min(output_len, 8)) for ids, output_len in workload[:count]]


def transformers_batches(workload: list[tuple[list[int], int]], batch_size: int) -> list[list[tuple[list[int], int]]]:
    """generate() runs every row of a batch until the longest is done, so batches of similar
    output length waste the fewest steps; within those, similar input lengths pad least."""
    order = sorted(range(len(workload)), key=lambda i: (workload[i][1], len(workload[i][0])))
    return [[workload[i] for i in order[first : first + batch_size]] for first in range(0, len(order), batch_size)]


def transformers_cache_bytes(workload: list[tuple[list[int], int]], batch_size: int, kv_bytes_per_token: int) -> int:
    """KV cache of transformers' largest padded batch at its last step: every row holds the
    longest input plus the most output tokens of its batch."""
    return max(len(batch) * (max(len(ids) for ids, _ in batch) + max(n for _, n in batch)) * kv_bytes_per_token
               for batch in transformers_batches(workload, batch_size))


def run_transformers(model, workload: list[tuple[list[int], int]], batch_size: int) -> tuple[float, int]:
    from transformers import GenerationConfig

    from fitserve.bench.roofline import synchronize

    start = time.perf_counter()
    for batch in transformers_batches(workload, batch_size):
        longest = max(len(ids) for ids, _ in batch)
        input_ids = torch.zeros((len(batch), longest), dtype=torch.long, device=model.device)
        attention_mask = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(batch):  # left padding, as decoder-only generation needs
            input_ids[row, longest - len(ids):] = torch.tensor(ids)
            attention_mask[row, longest - len(ids):] = 1
        config = GenerationConfig(max_new_tokens=max(n for _, n in batch), do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    synchronize(model.device)
    elapsed = time.perf_counter() - start
    return elapsed, sum(n for _, n in workload)


def transformers_key(batch_size: int) -> str:
    return f"transformers_b{batch_size}"


def summarize_runs(result: dict) -> None:
    """Medians per system and the ratio to transformers' best batch size, from the runs so far."""
    runs = result["runs"]
    result["fitserve_output_tokens_per_s"] = summarize([r["output_tokens_per_s"] for r in runs["fitserve"]])
    measured = {key: summarize([r["output_tokens_per_s"] for r in values])
                for key, values in runs.items() if key != "fitserve" and values}
    if not measured or not runs["fitserve"]:
        return
    best_key = max(measured, key=lambda key: measured[key]["median"])
    result["transformers_output_tokens_per_s"] = measured[best_key]
    result["transformers_by_batch_size"] = measured
    result["transformers_best_batch_size"] = int(best_key.rsplit("_b", 1)[1])
    result["ratio_fitserve_over_transformers"] = (
        result["fitserve_output_tokens_per_s"]["median"] / measured[best_key]["median"]
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--hf-batch-size", type=int, nargs="+", default=[16],
                        help="transformers batch size(s); with several, each runs and the best counts")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="fitserve's token budget per step (default 8192 on a GPU, where fewer, larger "
                             "prefill steps cost less host time; the engine's 2048 on a CPU)")
    parser.add_argument("--gpu-memory-utilization", type=float, default=None,
                        help="fitserve's share of GPU memory (default 0.45 when transformers runs in the "
                             "same process, so that its cache fits in the rest; 0.9 alone)")
    parser.add_argument("--warmup-prompts", type=int, default=8, help="untimed requests per system first")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from fitserve import LLM
    from fitserve.bench.roofline import ModelShape

    model_dir = random_checkpoint(args.preset, args.dtype)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if on_cpu:
        memory = {"kv_cache_memory": "4GiB"}
    else:
        memory = {"gpu_memory_utilization": args.gpu_memory_utilization
                  or (0.9 if args.skip_transformers else 0.45)}
    budget = args.max_num_batched_tokens or (None if on_cpu else 8192)
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_num_seqs=args.num_prompts, **memory,
              **({"max_num_batched_tokens": budget} if budget else {}))
    vocab_size = llm.engine.model_config.vocab_size
    kv_bytes_per_token = ModelShape.from_model_dir(model_dir, args.dtype, llm.engine.device).kv_bytes_per_token
    workload = make_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab_size, args.seed)
    hf_model = None if args.skip_transformers else AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, args.dtype)).to(llm.engine.device).eval()

    if args.warmup_prompts > 0:
        warmup = warmup_workload(workload, args.warmup_prompts)
        run_fitserve(llm, warmup[:1])  # a lone sequence and a batch take different kernel variants
        run_fitserve(llm, warmup)
        if hf_model is not None:
            run_transformers(hf_model, warmup, min(args.hf_batch_size))

    runs: dict[str, list[dict]] = {"fitserve": []}
    runs |= {transformers_key(size): [] for size in ([] if hf_model is None else args.hf_batch_size)}
    result = {
        "benchmark": "offline_throughput",
        "machine": describe_machine(),
        "model": {"preset": args.preset, "dtype": args.dtype, "weights": "random (shape only)"},
        "device": str(llm.engine.device),
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "seed": args.seed, "total_input_tokens": sum(len(ids) for ids, _ in workload),
                     "total_output_tokens": sum(n for _, n in workload), "ignore_eos": True},
        "settings": {"transformers_batch_sizes": args.hf_batch_size,
                     "transformers_batching": "left padding, batches grouped by output length",
                     "warmup_prompts": args.warmup_prompts, "fitserve_memory": memory,
                     "fitserve": {"max_num_batched_tokens": llm.engine.args.max_num_batched_tokens,
                                  "max_num_seqs": llm.engine.args.max_num_seqs,
                                  "cuda_graphs": llm.engine.runner.decode_graphs is not None}},
        "runs": runs,
        "complete": False,
    }

    def record(repeat: int, key: str, elapsed: float, tokens: int) -> None:
        runs[key].append({"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed})
        print(f"[{repeat}] {key:<16} {tokens / elapsed:9.1f} output tok/s ({elapsed:.1f} s)", flush=True)
        summarize_runs(result)
        write_result("offline_throughput", result, args.out)

    out_of_memory: set[int] = set()
    for repeat in range(args.repeats):
        record(repeat, "fitserve", *run_fitserve(llm, workload))
        for size in [] if hf_model is None else sorted(args.hf_batch_size):
            if size in out_of_memory:
                continue
            if not on_cpu:
                # A batch whose cache cannot fit would run for minutes before failing.
                free_bytes, _ = torch.cuda.mem_get_info(llm.engine.device)
                needed = transformers_cache_bytes(workload, size, kv_bytes_per_token)
                if needed > 0.9 * free_bytes:
                    out_of_memory.update(other for other in args.hf_batch_size if other >= size)
                    result["transformers_out_of_memory_batch_sizes"] = sorted(out_of_memory)
                    print(f"[{repeat}] transformers batch {size}: its cache needs {needed / 2**30:.1f} GiB, "
                          f"{free_bytes / 2**30:.1f} GiB free; skipped", flush=True)
                    continue
            try:
                record(repeat, transformers_key(size), *run_transformers(hf_model, workload, size))
                continue
            except torch.cuda.OutOfMemoryError:
                pass
            # Larger batches would not fit either; the smaller ones already measured stand.
            torch.cuda.empty_cache()
            out_of_memory.update(other for other in args.hf_batch_size if other >= size)
            result["transformers_out_of_memory_batch_sizes"] = sorted(out_of_memory)
            print(f"[{repeat}] transformers batch {size}: out of GPU memory", flush=True)

    result["complete"] = True
    if "ratio_fitserve_over_transformers" in result:
        print(f"fitserve / transformers (best batch size, {result['transformers_best_batch_size']}) = "
              f"{result['ratio_fitserve_over_transformers']:.2f}x")
    path = write_result("offline_throughput", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Offline batch throughput: fitserve's `LLM.generate` vs transformers' `generate`, same run.

Random weights with the shape of a real model (speed does not depend on weight values), a
fixed-seed workload of token-id prompts with random input/output lengths, EOS ignored so both
systems produce exactly the requested tokens. transformers runs in padded batches sorted by
length (its best offline setting); its output-token count is the requested tokens, not the
padding it also computes. Systems alternate within each repetition; the JSON has every run.

    python benchmarks/offline_throughput.py                      # Qwen2.5-0.5B shape, bf16, 64 prompts
    python benchmarks/offline_throughput.py --num-prompts 16 --repeats 1 --preset qwen3-0.6b

On a GPU, nano-vllm's recipe (256 requests, input and output lengths uniform in 100–1024):

    python benchmarks/offline_throughput.py --device cuda --preset qwen3-0.6b --num-prompts 256 \
        --input-len 100 1024 --output-len 100 1024 --hf-batch-size 64
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


def run_transformers(model, workload: list[tuple[list[int], int]], batch_size: int) -> tuple[float, int]:
    from transformers import GenerationConfig

    order = sorted(range(len(workload)), key=lambda i: len(workload[i][0]))
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        batch = [workload[i] for i in order[first : first + batch_size]]
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
    elapsed = time.perf_counter() - start
    return elapsed, sum(n for _, n in workload)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, nargs=2, default=(32, 256), metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=(16, 128), metavar=("MIN", "MAX"))
    parser.add_argument("--hf-batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/)")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from fitserve import LLM

    model_dir = random_checkpoint(args.preset, args.dtype)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_num_seqs=args.num_prompts,
              **({"kv_cache_memory": "4GiB"} if on_cpu else {}))
    vocab_size = llm.engine.model_config.vocab_size
    workload = make_workload(args.num_prompts, tuple(args.input_len), tuple(args.output_len), vocab_size, args.seed)
    hf_model = None if args.skip_transformers else AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=getattr(torch, args.dtype)).to(llm.engine.device).eval()

    runs: dict[str, list[dict]] = {"fitserve": [], "transformers": []}
    for repeat in range(args.repeats):
        elapsed, tokens = run_fitserve(llm, workload)
        runs["fitserve"].append({"seconds": elapsed, "output_tokens": tokens, "output_tokens_per_s": tokens / elapsed})
        print(f"[{repeat}] fitserve      {tokens / elapsed:8.1f} output tok/s ({elapsed:.1f} s)", flush=True)
        if hf_model is not None:
            elapsed, tokens = run_transformers(hf_model, workload, args.hf_batch_size)
            runs["transformers"].append({"seconds": elapsed, "output_tokens": tokens,
                                         "output_tokens_per_s": tokens / elapsed})
            print(f"[{repeat}] transformers  {tokens / elapsed:8.1f} output tok/s ({elapsed:.1f} s)", flush=True)

    result = {
        "benchmark": "offline_throughput",
        "machine": describe_machine(),
        "model": {"preset": args.preset, "dtype": args.dtype, "weights": "random (shape only)"},
        "device": str(llm.engine.device),
        "workload": {"num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
                     "seed": args.seed, "total_input_tokens": sum(len(ids) for ids, _ in workload),
                     "total_output_tokens": sum(n for _, n in workload), "ignore_eos": True},
        "settings": {"transformers_batch_size": args.hf_batch_size, "transformers_padding": "left, sorted by length",
                     "fitserve": {"max_num_batched_tokens": llm.engine.args.max_num_batched_tokens,
                                  "max_num_seqs": llm.engine.args.max_num_seqs}},
        "runs": runs,
        "fitserve_output_tokens_per_s": summarize([r["output_tokens_per_s"] for r in runs["fitserve"]]),
    }
    if runs["transformers"]:
        result["transformers_output_tokens_per_s"] = summarize([r["output_tokens_per_s"] for r in runs["transformers"]])
        result["ratio_fitserve_over_transformers"] = (
            result["fitserve_output_tokens_per_s"]["median"] / result["transformers_output_tokens_per_s"]["median"]
        )
        print(f"fitserve / transformers = {result['ratio_fitserve_over_transformers']:.2f}x")
    path = write_result("offline_throughput", result, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

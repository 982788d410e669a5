"""Single-stream decode and long-prompt prefill against the device's own limits, one run.

Decode is memory-bound: each step reads every weight plus the request's KV cache, so the best
possible rate is bandwidth / bytes per step. Prefill of a long prompt is compute-bound:
2 · parameters · tokens FLOPs (plus attention) at the device's matmul rate. Both limits are
measured here, in the same run (a large device-to-device copy; large matmuls in the model's
dtype), and the JSON reports achieved / limit.

Meant for a GPU (issue targets: Llama-3-8B shape in bfloat16, decode ≥ 80% of the HBM bound,
4096-token prefill ≥ 50% of matmul FLOP/s), and runs anywhere for a smoke check:

    python benchmarks/gpu_decode.py                                  # llama-3-8b, bf16, cuda
    python benchmarks/gpu_decode.py --preset qwen2.5-0.5b --device cpu --dtype float32 \\
        --num-layers 2 --prefill-len 256 --decode-tokens 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, random_checkpoint, write_result  # noqa: E402


def decode_rate(llm, prompt: list[int], num_tokens: int) -> float:
    """Tokens/s between the first and the last generated token of one request."""
    from fitserve import SamplingParams

    output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=num_tokens, ignore_eos=True))[0]
    metrics = output.metrics
    return (num_tokens - 1) / (metrics.finished_time - metrics.first_token_time)


def prefill_seconds(llm, prompt: list[int]) -> float:
    """Time to the first token of a prompt computed in one step (no prefix-cache help)."""
    from fitserve import SamplingParams

    output = llm.generate({"prompt_token_ids": prompt}, SamplingParams(max_tokens=1, ignore_eos=True))[0]
    return output.metrics.first_token_time - output.metrics.first_scheduled_time


def summarize(args: argparse.Namespace, shape, device: torch.device, cuda_graphs: bool,
              runs: dict[str, list[float]], complete: bool) -> dict:
    """The JSON result from the repetitions so far: medians, bounds and fractions."""
    bandwidth, peak_flops = statistics.median(runs["bandwidth"]), statistics.median(runs["matmul"])
    mean_context = args.prompt_len + args.decode_tokens / 2
    step_bytes = shape.decode_step_bytes(1, mean_context)
    bound_rate = bandwidth / step_bytes
    achieved_rate = statistics.median(runs["decode"])
    prefill_time = statistics.median(runs["prefill"])
    prefill_flops = shape.prefill_flops(args.prefill_len)
    return {
        "benchmark": "gpu_decode",
        "machine": describe_machine(),
        "model": {"preset": args.preset, "dtype": args.dtype, "num_layers": shape.num_layers,
                  "weights": "random (shape only)", "shape": shape.to_dict()},
        "device": str(device),
        "cuda_graphs": cuda_graphs,
        "complete": complete,
        "limits": {"copy_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": peak_flops,
                   "runs": {"bandwidth": runs["bandwidth"], "matmul": runs["matmul"]}},
        "decode": {"prompt_len": args.prompt_len, "tokens": args.decode_tokens, "bytes_per_step": step_bytes,
                   "tokens_per_s": achieved_rate, "runs": runs["decode"], "bound_tokens_per_s": bound_rate,
                   "fraction_of_bound": achieved_rate / bound_rate},
        "prefill": {"prompt_len": args.prefill_len, "seconds": prefill_time, "runs": runs["prefill"],
                    "flops": prefill_flops, "achieved_flops_per_s": prefill_flops / prefill_time,
                    "fraction_of_matmul_peak": prefill_flops / prefill_time / peak_flops},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-3-8b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--num-layers", type=int, default=None, help="shrink the model (smoke runs)")
    parser.add_argument("--prompt-len", type=int, default=128, help="context before decoding")
    parser.add_argument("--decode-tokens", type=int, default=256)
    parser.add_argument("--prefill-len", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--enforce-eager", action="store_true",
                        help="no CUDA graphs (run once with and once without to see what they save)")
    parser.add_argument("--kv-cache-memory", default=None, help="KV budget (default: 1GiB on CPU, 8GiB on GPU)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU (or pass --device cpu for a smoke run)", file=sys.stderr)
        return 2

    from fitserve import LLM
    from fitserve.bench.roofline import ModelShape, measure_matmul_flops, measure_memory_bandwidth

    model_dir = random_checkpoint(args.preset, args.dtype, args.num_layers)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    context = max(args.prefill_len, args.prompt_len + args.decode_tokens) + 16
    llm = LLM(str(model_dir), dtype=args.dtype, device=args.device, max_model_len=context,
              max_num_batched_tokens=max(2048, args.prefill_len), enable_prefix_caching=False,
              enforce_eager=args.enforce_eager, max_num_seqs=8,
              kv_cache_memory=args.kv_cache_memory or ("1GiB" if device.type == "cpu" else "8GiB"))
    cuda_graphs = llm.engine.runner.decode_graphs is not None
    shape = ModelShape.from_model_dir(model_dir, args.dtype, device)
    vocab = shape.vocab_size
    generator = torch.Generator().manual_seed(0)
    decode_prompt = torch.randint(10, vocab, (args.prompt_len,), generator=generator).tolist()
    prefill_prompt = torch.randint(10, vocab, (args.prefill_len,), generator=generator).tolist()
    decode_rate(llm, decode_prompt, 8)  # warm-up: allocator, kernels, caches
    prefill_seconds(llm, prefill_prompt)  # the long prompt's kernel variants and activation sizes

    runs: dict[str, list[float]] = {"bandwidth": [], "matmul": [], "decode": [], "prefill": []}
    mode = "graphs" if cuda_graphs else "eager"
    for repeat in range(args.repeats):  # limits and the run alternate, so drift shows up in both
        runs["bandwidth"].append(measure_memory_bandwidth(device, size_bytes=1 << 30 if device.type == "cuda" else None))
        runs["matmul"].append(measure_matmul_flops(device, dtype)[0])
        runs["decode"].append(decode_rate(llm, decode_prompt, args.decode_tokens))
        runs["prefill"].append(prefill_seconds(llm, prefill_prompt))
        print(f"[{repeat}] decode {runs['decode'][-1]:.1f} tok/s, prefill {runs['prefill'][-1] * 1e3:.0f} ms, "
              f"copy {runs['bandwidth'][-1] / 1e9:.0f} GB/s, matmul {runs['matmul'][-1] / 1e12:.1f} TFLOP/s",
              flush=True)
        # Rewritten after every repetition: a run cut short still leaves what it measured.
        result = summarize(args, shape, device, cuda_graphs, runs, complete=repeat + 1 == args.repeats)
        path = write_result(f"gpu_decode-{args.preset}-{device.type}-{mode}", result, args.out)

    print(f"decode {result['decode']['tokens_per_s']:.1f} tok/s = {result['decode']['fraction_of_bound']:.0%} of "
          f"the {result['decode']['bound_tokens_per_s']:.1f} tok/s bound; prefill "
          f"{result['prefill']['fraction_of_matmul_peak']:.0%} of matmul peak")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

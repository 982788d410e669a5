"""Dequantizing matmuls on a GPU: the Triton w8 / w4 / MixLLM kernels vs the bf16 cuBLAS matmul.

A decode step reads every weight once, so a weight format's speed-up is at best its bytes
ratio (w8 ~2x, w4 G=128 ~3.8x over bf16), reached only if the kernel streams weights near
the memory bandwidth. For each linear layer of Llama-3-8B and Qwen2.5-0.5B (fused QKV, O,
fused gate/up, down, LM head) and each row count this script times, with bfloat16 x:

- `bf16`: torch.nn.functional.linear with the bf16 weight (cuBLAS), the baseline;
- `w8`, `w4`: fitserve.kernels.triton_quant with the tiles `choose_config` picks;
- `mixllm`: 90% of the output channels in w4 and 10% in w8, two launches writing one output
  through `out_rows` (MixLLM's layer);
- for decode rows, a sweep of fixed (block_n, split_k) tiles for w8 and w4, to tune
  `choose_config` per GPU ("best" names the fastest).

Each time is the median of CUDA-event timings with L2 evicted before each repetition.
Reported per implementation: achieved GB/s (weight, scale, zero, x and output bytes / time)
and its fraction of the device-to-device copy bandwidth measured in the same run; for
prefill rows, TFLOP/s (2 M N K / time); the speed-up over bf16; and the error against
dequantize-then-float32-matmul relative to the largest output (GPU numerics check).

    python benchmarks/gpu_quant_kernels.py
    python benchmarks/gpu_quant_kernels.py --models qwen2.5-0.5b --rows 1 16 --no-sweep

Results go to benchmarks/results/gpu_quant_kernels-<gpu>-<UTC time>.json (rewritten after
every shape, so a run cut short keeps what it measured) with GPU name, driver, torch, CUDA
and Triton versions.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import describe_machine, write_result  # noqa: E402
from gpu_kernels import L2_FLUSH_BYTES, gpu_description, time_cold_l2  # noqa: E402

from fitserve.models.random_checkpoint import PRESETS  # noqa: E402
from fitserve.quant import packing  # noqa: E402

DEVICE = torch.device("cuda")
DTYPE = torch.bfloat16
GROUP_SIZE = 128
HIGH_PRECISION_FRACTION = 0.10
SWEEP_BLOCK_N = (32, 64)
SWEEP_SPLIT_K = (1, 2, 4, 8, 16)


def layer_shapes(preset: str) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each distinct linear layer of a preset, as fitserve
    fuses them (QKV in one matrix, gate and up in one)."""
    config = PRESETS[preset]
    hidden, heads, kv_heads = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    return {
        "qkv_proj": ((heads + 2 * kv_heads) * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_up_proj": (2 * config["intermediate_size"], hidden),
        "down_proj": (hidden, config["intermediate_size"]),
        "lm_head": (config["vocab_size"], hidden),
    }


def bench_layer(
    name: str, out_features: int, in_features: int, rows_list: list[int], sweep: bool,
    repetitions: int, copy_bandwidth: float, flush: torch.Tensor,
) -> list[dict[str, Any]]:
    """Every implementation on one weight shape, for each row count."""
    from fitserve.kernels import triton_quant
    from fitserve.kernels.triton_quant import TileConfig

    generator = torch.Generator(device=DEVICE).manual_seed(out_features * 7 + in_features)
    weight = 0.02 * torch.randn((out_features, in_features), generator=generator, device=DEVICE)
    q8, s8 = packing.quantize_w8(weight)
    q4, s4, z4 = packing.quantize_w4(weight, GROUP_SIZE)
    salient_count = max(1, round(HIGH_PRECISION_FRACTION * out_features))
    order = torch.randperm(out_features, generator=generator, device=DEVICE)
    salient, rest = order[:salient_count].sort().values, order[salient_count:].sort().values
    mix8 = packing.quantize_w8(weight[salient])
    mix4 = packing.quantize_w4(weight[rest], GROUP_SIZE)
    dense = weight.to(DTYPE)
    weight_bytes = {
        "bf16": dense.numel() * 2,
        "w8": q8.numel() + s8.numel() * 4,
        "w4": q4.numel() + s4.numel() * 2 + z4.numel(),
        "mixllm": sum(tensor.numel() * tensor.element_size() for tensor in (*mix8, *mix4)),
    }
    references = {
        "bf16": dense.float(),
        "w8": packing.dequantize_w8(q8, s8),
        "w4": packing.dequantize_w4(q4, s4, z4, GROUP_SIZE),
    }
    references["mixllm"] = torch.empty_like(weight)
    references["mixllm"][salient] = packing.dequantize_w8(*mix8)
    references["mixllm"][rest] = packing.dequantize_w4(*mix4, GROUP_SIZE)
    del weight

    results = []
    for rows in rows_list:
        x = torch.randn((rows, in_features), generator=generator, device=DEVICE).to(DTYPE)
        mixed_out = torch.empty((rows, out_features), dtype=DTYPE, device=DEVICE)

        def mixllm() -> torch.Tensor:
            triton_quant.w8_linear(x, *mix8, out=mixed_out, out_rows=salient)
            return triton_quant.w4_linear(x, *mix4, GROUP_SIZE, out=mixed_out, out_rows=rest)

        candidates: dict[str, tuple[str, Callable[[], torch.Tensor]]] = {
            "bf16": ("bf16", lambda: torch.nn.functional.linear(x, dense)),
            "w8": ("w8", lambda: triton_quant.w8_linear(x, q8, s8)),
            "w4": ("w4", lambda: triton_quant.w4_linear(x, q4, s4, z4, GROUP_SIZE)),
            "mixllm": ("mixllm", mixllm),
        }
        if sweep and rows <= triton_quant.DECODE_MAX_ROWS:
            for block_n in SWEEP_BLOCK_N:
                for split_k in SWEEP_SPLIT_K:
                    config = TileConfig(16, block_n, 128, split_k, 4, 4)
                    candidates[f"w8_n{block_n}_split{split_k}"] = (
                        "w8", lambda config=config: triton_quant.w8_linear(x, q8, s8, config=config))
                    candidates[f"w4_n{block_n}_split{split_k}"] = (
                        "w4", lambda config=config: triton_quant.w4_linear(x, q4, s4, z4, GROUP_SIZE, config=config))

        shape: dict[str, Any] = {
            "layer": name, "out_features": out_features, "in_features": in_features, "rows": rows,
            "chosen_w8_config": vars(triton_quant.choose_config(rows, out_features, in_features, DTYPE, DEVICE)),
            "chosen_w4_config": vars(triton_quant.choose_config(
                rows, out_features, in_features, DTYPE, DEVICE, GROUP_SIZE)),
            "implementations": {},
        }
        activation_bytes = (rows * in_features + rows * out_features) * 2
        flops = 2 * rows * out_features * in_features
        for label, (weight_format, run) in candidates.items():
            expected = x.float() @ references[weight_format].T
            error = (run().float() - expected).abs().max().item() / expected.abs().max().item()
            times = time_cold_l2(run, repetitions, flush)
            median = statistics.median(times)
            moved = weight_bytes[weight_format] + activation_bytes
            shape["implementations"][label] = {
                "median_us": median * 1e6,
                "min_us": min(times) * 1e6,
                "bytes_moved": moved,
                "achieved_gb_per_s": moved / median / 1e9,
                "fraction_of_copy_bandwidth": moved / median / copy_bandwidth,
                "tflop_per_s": flops / median / 1e12,
                "max_error_relative_to_largest_output": error,
            }
        implementations = shape["implementations"]
        for label, entry in implementations.items():
            entry["speedup_over_bf16"] = implementations["bf16"]["median_us"] / entry["median_us"]
        for weight_format in ("w8", "w4"):
            swept = [label for label in implementations if label.startswith(f"{weight_format}_n")]
            if swept:
                shape[f"best_{weight_format}"] = min(swept, key=lambda label: implementations[label]["median_us"])
        print_row(shape)
        results.append(shape)
    return results


def print_row(shape: dict[str, Any]) -> None:
    implementations = shape["implementations"]
    cells = " | ".join(
        f"{label} {implementations[label]['median_us']:8.1f} us {implementations[label]['achieved_gb_per_s']:6.0f} GB/s"
        f" x{implementations[label]['speedup_over_bf16']:.2f}"
        for label in ("bf16", "w8", "w4", "mixllm")
    )
    best = " ".join(f"best {shape[key]}" for key in ("best_w8", "best_w4") if key in shape)
    worst_error = max(entry["max_error_relative_to_largest_output"] for entry in implementations.values())
    print(f"{shape['layer']:>12} {shape['out_features']:>6}x{shape['in_features']:<5} M={shape['rows']:<5} "
          f"{cells} | {best} | max rel err {worst_error:.1e}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["llama-3-8b", "qwen2.5-0.5b"], choices=sorted(PRESETS))
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 2048],
                        help="rows of x (tokens): up to 16 take the decode kernels, more the prefill ones")
    parser.add_argument("--no-sweep", action="store_true", help="skip the decode tile sweep")
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/)")
    args = parser.parse_args()

    if not torch.cuda.is_available():  # Triton itself comes with torch's CUDA builds
        sys.exit("benchmarks/gpu_quant_kernels.py needs a CUDA GPU (torch.cuda.is_available() is False); "
                 "on CPU, pytest tests/kernels/test_triton_quant.py checks the kernels in Triton's interpreter.")
    from fitserve.bench.roofline import measure_memory_bandwidth

    copy_bandwidth = measure_memory_bandwidth(DEVICE, size_bytes=2**30, min_time_s=1.0)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=DEVICE)
    description = gpu_description()
    print(f"{description['gpu_name']} driver {description['driver']} torch {description['torch']} "
          f"triton {description['triton']}: copy bandwidth {copy_bandwidth / 1e9:.0f} GB/s")

    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", description["gpu_name"]).strip("-").lower()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result: dict[str, Any] = {
        "benchmark": "dequantizing matmuls: Triton w8 / w4 / MixLLM vs bf16 cuBLAS (F.linear)",
        "machine": describe_machine(),
        **description,
        "x_dtype": str(DTYPE).removeprefix("torch."),
        "w4_group_size": GROUP_SIZE,
        "mixllm_high_precision_fraction": HIGH_PRECISION_FRACTION,
        "copy_bandwidth_gb_per_s": copy_bandwidth / 1e9,
        "copy_bandwidth_method": "best of repeated 1 GiB device-to-device tensor copies (read + write)",
        "timing_method": f"median of {args.repetitions} CUDA-event timings, L2 evicted before each",
        "bytes_moved_method": "weight + scales + zeros (stored sizes) + x + output, each once",
        "layers": [],
    }
    for preset in args.models:
        for name, (out_features, in_features) in layer_shapes(preset).items():
            shapes = bench_layer(f"{preset}:{name}", out_features, in_features, args.rows, not args.no_sweep,
                                 args.repetitions, copy_bandwidth, flush)
            result["layers"].extend(shapes)
            path = write_result(f"gpu_quant_kernels-{gpu_slug}-{stamp}", result, args.out)
            torch.cuda.empty_cache()
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

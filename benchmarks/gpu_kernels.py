"""Decode attention on a GPU: the Triton split-KV kernel vs the torch path, same run.

Decode reads every cached K/V byte once and does little arithmetic per byte, so its limit is
memory bandwidth. For each batch size and context length this script times one layer's
decode attention over a paged bfloat16 cache with Llama-3-8B's attention shape (32 query
heads over 8 KV heads of width 128, 16-token blocks shuffled across the cache), converts the
median time into achieved GB/s (K/V bytes read / time), and sets that against the device's
own device-to-device copy bandwidth measured in the same run. It also sweeps the decode
kernel's partition size (the number of context tokens per program) against the size the
kernel picks per batch ("triton"), so the choice can be tuned per GPU, and records each
path's largest error against float32 attention.

Each timed repetition starts with a cold L2 cache (a 256 MiB buffer is overwritten first),
because small caches would otherwise be served from L2 and overstate the bandwidth.

    python benchmarks/gpu_kernels.py
    python benchmarks/gpu_kernels.py --batch-sizes 1 8 --context-lens 2048 --partition-sizes 256

Results go to benchmarks/results/gpu_kernels-<gpu>-<UTC time>.json with GPU name, driver,
torch, CUDA and Triton versions.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import describe_machine, write_result  # noqa: E402

from fitserve.attention.metadata import AttentionMetadata  # noqa: E402

NUM_HEADS = 32
NUM_KV_HEADS = 8
HEAD_DIM = 128
DTYPE = torch.bfloat16
DEVICE = torch.device("cuda")
L2_FLUSH_BYTES = 256 * 2**20
"""Larger than the L2 cache of any current GPU (H100: 50 MiB, H200: 60 MiB)."""


def gpu_description() -> dict[str, Any]:
    """What the numbers were measured on: GPU, driver and the versions of the software stack."""
    import triton

    properties = torch.cuda.get_device_properties(0)
    return {
        "gpu_name": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1),
        "streaming_multiprocessors": properties.multi_processor_count,
        "driver": nvidia_driver_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
    }


def nvidia_driver_version() -> str | None:
    """The driver version from NVML if installed (the `cuda` extra), else from nvidia-smi."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # missing library or no NVML: fall back to the command-line tool
        pass
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        output = subprocess.run(query, capture_output=True, text=True, check=False).stdout
        return output.splitlines()[0].strip() if output.strip() else None
    return None


def make_decode_batch(
    batch_size: int, context_len: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Query, K/V caches and metadata for one decode step with every block placed at random."""
    device = DEVICE
    blocks_per_seq = -(-context_len // block_size)
    num_blocks = batch_size * blocks_per_seq
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(cache_shape, generator=generator, device=device, dtype=DTYPE)
    value_cache = torch.randn(cache_shape, generator=generator, device=device, dtype=DTYPE)
    block_tables = torch.randperm(num_blocks, generator=generator, device=device)
    block_tables = block_tables.view(batch_size, blocks_per_seq).to(torch.int32)
    query = torch.randn(
        (batch_size, NUM_HEADS, HEAD_DIM), generator=generator, device=device, dtype=DTYPE
    )
    last_slots = block_tables[:, (context_len - 1) // block_size].long() * block_size
    metadata = AttentionMetadata(
        query_start_loc=torch.arange(batch_size + 1, dtype=torch.int32, device=device),
        seq_lens=torch.full((batch_size,), context_len, dtype=torch.int32, device=device),
        block_tables=block_tables,
        slot_mapping=last_slots + (context_len - 1) % block_size,
        query_lens_cpu=[1] * batch_size,
        seq_lens_cpu=[context_len] * batch_size,
        block_size=block_size,
    )
    return query, key_cache, value_cache, metadata


def time_cold_l2(run: Callable[[], object], repetitions: int, flush: torch.Tensor) -> list[float]:
    """Seconds per call of `run`, each timed with CUDA events after evicting L2."""
    for _ in range(3):  # compile / autotune / allocator warm-up
        run()
    times: list[float] = []
    for _ in range(repetitions):
        flush.zero_()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def bench_shape(
    batch_size: int,
    context_len: int,
    block_size: int,
    partition_sizes: list[int],
    repetitions: int,
    copy_bandwidth: float,
    flush: torch.Tensor,
) -> dict[str, Any]:
    """Every implementation on one (batch, context) shape; times in microseconds."""
    from fitserve.attention import torch_paged, triton_paged
    from fitserve.attention.triton_decode import choose_partition_size, decode_attention

    generator = torch.Generator(device=DEVICE).manual_seed(batch_size * 100003 + context_len)
    query, key_cache, value_cache, metadata = make_decode_batch(
        batch_size, context_len, block_size, generator
    )
    scale = HEAD_DIM**-0.5
    kv_bytes = 2 * batch_size * context_len * NUM_KV_HEADS * HEAD_DIM * key_cache.element_size()

    candidates: dict[str, Callable[[], torch.Tensor]] = {
        "torch": lambda: torch_paged.paged_attention(query, key_cache, value_cache, metadata, scale),
        "triton": lambda: triton_paged.paged_attention(query, key_cache, value_cache, metadata, scale),
    }
    for partition_size in partition_sizes:
        candidates[f"triton_partition_{partition_size}"] = (
            lambda size=partition_size: decode_attention(
                query, key_cache, value_cache, metadata, scale, partition_size=size
            )
        )

    # Both paths are judged against exact attention over the same (bf16-valued) inputs.
    reference = torch_paged.paged_attention(
        query.float(), key_cache.float(), value_cache.float(), metadata, scale
    )
    result: dict[str, Any] = {
        "batch_size": batch_size,
        "context_len": context_len,
        "kv_bytes_read": kv_bytes,
        "chosen_partition_size": choose_partition_size(
            batch_size, NUM_KV_HEADS, context_len, query.device
        ),
        "implementations": {},
    }
    for name, run in candidates.items():
        max_abs_error = (run().float() - reference).abs().max().item()
        times = time_cold_l2(run, repetitions, flush)
        median = statistics.median(times)
        result["implementations"][name] = {
            "median_us": median * 1e6,
            "min_us": min(times) * 1e6,
            "max_us": max(times) * 1e6,
            "achieved_gb_per_s": kv_bytes / median / 1e9,
            "fraction_of_copy_bandwidth": kv_bytes / median / copy_bandwidth,
            "max_abs_error_vs_float32": max_abs_error,
        }
    torch_median = result["implementations"]["torch"]["median_us"]
    triton_median = result["implementations"]["triton"]["median_us"]
    result["triton_speedup_over_torch"] = torch_median / triton_median
    return result


def print_row(shape: dict[str, Any]) -> None:
    implementations = shape["implementations"]
    best_name = min(implementations, key=lambda name: implementations[name]["median_us"])
    print(
        f"batch {shape['batch_size']:>3} ctx {shape['context_len']:>5} "
        f"KV {shape['kv_bytes_read'] / 2**20:8.1f} MiB | "
        f"torch {implementations['torch']['median_us']:9.1f} us "
        f"{implementations['torch']['achieved_gb_per_s']:7.0f} GB/s | "
        f"triton {implementations['triton']['median_us']:8.1f} us "
        f"{implementations['triton']['achieved_gb_per_s']:7.0f} GB/s "
        f"({implementations['triton']['fraction_of_copy_bandwidth']:.0%} of copy) | "
        f"x{shape['triton_speedup_over_torch']:.1f} | partition {shape['chosen_partition_size']}, "
        f"best {best_name} | "
        f"err torch {implementations['torch']['max_abs_error_vs_float32']:.1e} "
        f"triton {implementations['triton']['max_abs_error_vs_float32']:.1e}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--context-lens", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--block-size", type=int, default=16, choices=[16, 32])
    parser.add_argument(
        "--partition-sizes", type=int, nargs="+", default=[64, 128, 256, 512],
        help="fixed decode partition sizes to time besides the per-batch choice (powers of two)",
    )
    parser.add_argument("--repetitions", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default: benchmarks/results/)")
    args = parser.parse_args()

    if not torch.cuda.is_available():
        sys.exit(
            "benchmarks/gpu_kernels.py times GPU kernels and needs a CUDA GPU, but "
            "torch.cuda.is_available() is False on this machine. (The kernels' correctness is "
            "tested on CPU by `pytest tests/attention` under TRITON_INTERPRET=1.)"
        )
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("Triton is not installed: pip install 'fitserve[cuda]' (or pip install triton).")
    from fitserve.bench.roofline import measure_memory_bandwidth

    device = DEVICE
    # 1 GiB copies (2 GiB moved) make the host-side timing overhead negligible.
    copy_bandwidth = measure_memory_bandwidth(device, size_bytes=2**30, min_time_s=1.0)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    description = gpu_description()
    print(
        f"{description['gpu_name']} driver {description['driver']} torch {description['torch']} "
        f"triton {description['triton']}: copy bandwidth {copy_bandwidth / 1e9:.0f} GB/s"
    )

    shapes = []
    for batch_size in args.batch_sizes:
        for context_len in args.context_lens:
            shape = bench_shape(
                batch_size, context_len, args.block_size, args.partition_sizes,
                args.repetitions, copy_bandwidth, flush,
            )
            print_row(shape)
            shapes.append(shape)
            torch.cuda.empty_cache()  # this shape's caches are garbage now; keep peak memory low

    result = {
        "benchmark": "decode paged attention, Triton split-KV kernel vs torch path",
        "machine": describe_machine(),
        **description,
        "attention_shape": {
            "num_heads": NUM_HEADS, "num_kv_heads": NUM_KV_HEADS, "head_dim": HEAD_DIM,
            "dtype": str(DTYPE).removeprefix("torch."), "block_size": args.block_size,
        },
        "copy_bandwidth_gb_per_s": copy_bandwidth / 1e9,
        "copy_bandwidth_method": "best of repeated 1 GiB device-to-device tensor copies (read + write)",
        "timing_method": f"median of {args.repetitions} CUDA-event timings, L2 evicted before each",
        "shapes": shapes,
    }
    gpu_slug = re.sub(r"[^A-Za-z0-9]+", "-", description["gpu_name"]).strip("-").lower()
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = write_result(f"gpu_kernels-{gpu_slug}-{stamp}", result, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Micro-benchmarks of the BitStack CPU kernel (fitserve/kernels/cpu_bitstack_linear.h).

    python benchmarks/cpu_bitstack_kernels.py                    # one decode row, Qwen2.5-0.5B shapes
    python benchmarks/cpu_bitstack_kernels.py --section ranks    # ranks 1..16 at w4's bytes, both decode kernels
    python benchmarks/cpu_bitstack_kernels.py --section rows     # kernel vs rebuild+matmul by rows of x
    python benchmarks/cpu_bitstack_kernels.py --section resize   # shrink/grow of a model's layers
    python benchmarks/cpu_bitstack_kernels.py --section engine   # single-stream decode through the engine

`gemv`: one row of x against each fused projection of a Qwen2.5-0.5B layer (qkv = q 896 +
k 128 + v 128 rows x 896, o 896x896, gate_up 2 x 4864 x 896, down 896x4864) and the LM head,
in three formats, calls alternating so a shared machine's swings hit all alike:
- bf16 through the streaming kernel (`linear_small_batch`, what a bf16 model runs),
- w4 group 128 through QuantLinear (the format whose memory sets the budget),
- BitStack rank 16 through BitStackLinear at `--blocks` blocks per matrix (random signs and
  factors: the kernel's time does not depend on their values).
Every variant has enough copies of its weights that each call reads them from memory.
The budget equal to w4's memory: w4 stores N K / 2 code bytes + 3 bytes per 128 weights (a
float16 scale and a uint8 zero); a rank-16 BitStack block stores N K / 8 sign bytes + 32 (N + K)
factor bytes, so the depth that fits w4's bytes is their ratio, summed over a layer's matrices
(`w4_equal_depth`, ~3.1 for Qwen2.5-0.5B). Reported per shape: best and median time, the
kernel's vpdpbusd count per call over the best time as a fraction of the machine's measured
vpdpbusd rate (`dpbusd_rate`, same run: the compute bound — BitStack decode is compute-bound,
N K r / 64 vpdpbusd per block and row), and bytes read per second as a fraction of the best
read rate (the bound of bf16 and w4).

The whole-model estimate (single-stream decode): 24 x (qkv + o + gate_up + down) + LM head per
token, bf16 model (bf16 tied head) vs BitStack (w8 head, as `fitserve quantize --method bitstack`
writes it) at the w4-equal depth (per-block time scaled linearly from the measured depth).
Attention, norms and the engine's per-step work are left out: they are the same for both and
would only raise the ratio, so the estimate is conservative.

`rows`: 1..16 rows of x against gate_up: the integer kernel against the rebuild-and-matmul path
of the same layer (sets decode_max_rows).

`resize`: a Qwen2.5-0.5B-shaped model's 96 fused layers at the w4-equal depth: time to drop
all but one block per part (`truncate`) and to append them back (`append_block`), the kernel
side of a resize (reading blocks from disk is the runtime format's).

`engine`: single-stream decode through fitserve (LLMEngine.step, one request, 128-token
prompt) of a random Qwen2.5-0.5B bf16 checkpoint and a random BitStack checkpoint of the same
shape (`--engine-rank`, default 1 as `--rank auto` picks, `--engine-blocks` stored) loaded with `--weight-memory` equal to what the
w4 model holds, both in one process, runs alternating. The bf16 model runs the fused C++ decode
stack; the BitStack model runs layer by layer (the stack declines BitStack weights so far), so
this also carries the Python per-layer overhead the fused stack avoids.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, write_result  # noqa: E402
from cpu_decode import measure_read_bandwidth  # noqa: E402

from fitserve.bench.roofline import memory_test_bytes  # noqa: E402
from fitserve.kernels import cpu  # noqa: E402
from fitserve.quant import bitstack_packing, packing  # noqa: E402

HIDDEN, INTERMEDIATE, KV_ROWS, LAYERS, VOCAB = 896, 4864, 128, 24, 151936
RANK = 16
W4_GROUP = 128
# Fused projections of one layer: name -> (parts' rows, in_features).
LAYER_SHAPES = {"qkv": ([HIDDEN, KV_ROWS, KV_ROWS], HIDDEN), "o": ([HIDDEN], HIDDEN),
                "gate_up": ([INTERMEDIATE, INTERMEDIATE], HIDDEN), "down": ([HIDDEN], INTERMEDIATE)}


def w4_bytes(rows: int, columns: int) -> int:
    """Bytes of a w4 group-128 matrix: packed codes plus a float16 scale and uint8 zero per group."""
    return rows * columns // 2 + rows * (columns // W4_GROUP) * 3


def w4_equal_depth(rank: int = RANK) -> float:
    """Blocks per matrix of rank `rank` whose bytes equal w4's over one layer's projections."""
    w4 = sum(w4_bytes(rows, k) for parts, k in LAYER_SHAPES.values() for rows in parts)
    block = sum(bitstack_packing.block_bytes(rows, k, rank) for parts, k in LAYER_SHAPES.values() for rows in parts)
    return w4 / block


def random_bitstack_layer(parts: list[int], columns: int, blocks: int, isa: str, rank: int = RANK, **kwargs):
    """A BitStackLinear with random rank-`rank` blocks (the kernel's time does not depend on values)."""
    layer = cpu.bitstack_linear(columns, sum(parts), None, isa, **kwargs)
    for rows in parts:
        index = layer.add_part(rows, rank)
        for _ in range(blocks):
            signs = torch.randint(0, 256, (rows, bitstack_packing.packed_columns(columns)), dtype=torch.uint8)
            layer.append_block(index, signs, (torch.randn(rows, rank) * 0.1).half(),
                               (torch.randn(rank, columns) * 0.1).half())
    return layer


def w4_layer(kernels, rows: int, columns: int):
    layer = kernels.QuantLinear(columns, rows, None, "auto")
    layer.add_w4(*packing.quantize_w4(torch.randn(rows, columns) * 0.02, W4_GROUP), W4_GROUP)
    return layer


def copies_for(bytes_per_copy: int, target: int) -> int:
    return max(1, -(-target // bytes_per_copy))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def gemv_section(args, kernels) -> dict:
    target = memory_test_bytes(torch.device("cpu"))
    isas = ["avx512_vnni", "avx2"] if kernels.has_avx512_vnni() else ["avx2"]
    dpbusd_rates = []
    results = {}
    shapes = {**LAYER_SHAPES, "lm_head": ([VOCAB], HIDDEN)}
    for name in args.shapes:
        parts, columns = shapes[name]
        rows = sum(parts)
        variants = {}  # name -> (callables over copies, bytes per call, vpdpbusd per call)
        bf16 = (torch.randn(rows, columns) * 0.02).to(torch.bfloat16)
        x16 = torch.randn(1, columns).to(torch.bfloat16)
        x32 = x16.float()
        bf16_copies = [bf16] + [bf16.clone() for _ in range(copies_for(bf16.nbytes, target) - 1)]
        variants["bf16 linear_small_batch"] = (
            [lambda w=w: kernels.linear_small_batch(x16, w, None) for w in bf16_copies], bf16.nbytes, 0)
        if name == "lm_head":  # stored in w8 next to BitStack projections
            layer = kernels.QuantLinear(columns, rows, None, "auto")
            layer.add_w8(*packing.quantize_w8(bf16.float()))
            variants["w8 QuantLinear"] = ([lambda: layer.forward(x32)], layer.bytes(), 0)
        else:
            first = w4_layer(kernels, rows, columns)
            w4 = [first] + [w4_layer(kernels, rows, columns) for _ in range(copies_for(first.bytes(), target) - 1)]
            variants["w4 QuantLinear"] = ([lambda layer=layer: layer.forward(x32) for layer in w4], first.bytes(), 0)
            for isa in isas:
                first = random_bitstack_layer(parts, columns, args.blocks, isa)
                layers = [first] + [random_bitstack_layer(parts, columns, args.blocks, isa)
                                    for _ in range(copies_for(first.bytes(), target) - 1)]
                dpbusd = sum(part_rows * -(-columns // 128) * 32 * -(-RANK // 16) for part_rows in parts) * args.blocks
                variants[f"bitstack {isa}"] = ([lambda layer=layer: layer.forward(x32) for layer in layers],
                                               first.bytes(), dpbusd)
        times = {v: [] for v in variants}
        reads = []
        order = list(variants)
        for round_index in range(args.rounds):
            reads.append(measure_read_bandwidth(min_time_s=0.05))
            if kernels.has_avx512_vnni():
                dpbusd_rates.append(kernels.dpbusd_rate(200000))
            for step in range(args.calls_per_round):
                v = order[(step + round_index) % len(order)]
                calls = variants[v][0]
                times[v].append(timed(calls[(step // len(order) + round_index) % len(calls)]))
        read_best = max(reads)
        dpbusd_best = max(dpbusd_rates) if dpbusd_rates else 0.0
        shape_result = {"parts_rows": parts, "in_features": columns, "read_bandwidth_best_bytes_per_s": read_best,
                        "dpbusd_rate_best_per_s": dpbusd_best, "variants": {}}
        for v, (_, nbytes, dpbusd) in variants.items():
            best, median = min(times[v]), statistics.median(times[v])
            entry = {"bytes": nbytes, "calls": len(times[v]), "best_ms": best * 1e3, "median_ms": median * 1e3,
                     "best_bytes_per_s": nbytes / best, "fraction_of_read_best": nbytes / best / read_best}
            if dpbusd:
                entry["dpbusd_per_call"] = dpbusd
                entry["fraction_of_dpbusd_peak"] = dpbusd / best / dpbusd_best if dpbusd_best else None
            shape_result["variants"][v] = entry
            extra = f" {entry['fraction_of_dpbusd_peak']:.2f} of vpdpbusd peak" if entry.get("fraction_of_dpbusd_peak") else ""
            print(f"{name:8s} {v:24s} best {best * 1e3:8.3f} ms median {median * 1e3:8.3f} ms "
                  f"{nbytes / best / 1e9:6.1f} GB/s = {nbytes / best / read_best:5.2f} of read{extra}", flush=True)
        results[name] = shape_result
        del variants
    return {"blocks": args.blocks, "rank": RANK, "w4_equal_depth": w4_equal_depth(), "shapes": results,
            "dpbusd_rate_best_per_s": max(dpbusd_rates) if dpbusd_rates else None,
            "model_estimate": model_estimate(results, args.blocks)}


def model_estimate(results: dict, blocks: int) -> dict:
    """Single-stream decode per token from the per-matrix best times (see the module docstring)."""
    if not all(name in results for name in [*LAYER_SHAPES, "lm_head"]):
        return {}
    depth = w4_equal_depth()
    layer = lambda variant, scale=1.0: sum(results[n]["variants"][variant]["best_ms"] for n in LAYER_SHAPES) * scale
    bf16 = LAYERS * layer("bf16 linear_small_batch") + results["lm_head"]["variants"]["bf16 linear_small_batch"]["best_ms"]
    head_w8 = results["lm_head"]["variants"]["w8 QuantLinear"]["best_ms"]
    estimate = {"w4_equal_depth": depth, "bf16_ms_per_token": bf16,
                "w4_ms_per_token": LAYERS * layer("w4 QuantLinear") + head_w8}
    for variant in results["qkv"]["variants"]:
        if variant.startswith("bitstack"):
            ms = LAYERS * layer(variant, depth / blocks) + head_w8
            estimate[f"{variant} ms_per_token"] = ms
            estimate[f"{variant} tok_s_ratio_to_bf16"] = bf16 / ms
    estimate["w4 tok_s_ratio_to_bf16"] = bf16 / estimate["w4_ms_per_token"]
    # The bf16 head is one 272 MB read per token; where it was read more slowly than the bf16
    # projections in this run (a shared machine, or 4 KiB pages), the ratio above flatters
    # BitStack: the same estimate with the head read at gate_up's bf16 rate.
    gate_up = results["gate_up"]["variants"]["bf16 linear_small_batch"]
    head_bytes = results["lm_head"]["variants"]["bf16 linear_small_batch"]["bytes"]
    bf16_even = LAYERS * layer("bf16 linear_small_batch") + head_bytes / gate_up["best_bytes_per_s"] * 1e3
    estimate["bf16_ms_per_token_head_at_projection_rate"] = bf16_even
    for variant in results["qkv"]["variants"]:
        if variant.startswith("bitstack"):
            estimate[f"{variant} tok_s_ratio_to_bf16_head_at_projection_rate"] = bf16_even / estimate[f"{variant} ms_per_token"]
            estimate[f"{variant} projections_time_ratio_to_bf16"] = layer(variant, depth / blocks) / layer("bf16 linear_small_batch")
    print("whole-model estimate:", {k: round(v, 3) for k, v in estimate.items()}, flush=True)
    return estimate


def ranks_section(args, kernels) -> dict:
    """Per rank: each layer shape at the w4-equal depth of that rank (rounded to whole blocks),
    through the columns-in-lanes kernel (small_rank_max = rank) and the lane-per-rank kernel
    (small_rank_max = 0), against bf16 and w4 in the same rounds; the whole-model estimate per
    rank and kernel (per-block time scaled to the exact w4-equal depth)."""
    target = memory_test_bytes(torch.device("cpu"))
    shapes = {**LAYER_SHAPES, "lm_head": ([VOCAB], HIDDEN)}
    times: dict[tuple[str, str], list[float]] = {}
    results: dict = {"ranks": {}, "shapes": {}}
    dpbusd: dict[str, int] = {}
    dpbusd_rates: list[float] = []
    for name, (parts, columns) in shapes.items():
        rows = sum(parts)
        x16 = torch.randn(1, columns).to(torch.bfloat16)
        x32 = x16.float()
        bf16 = (torch.randn(rows, columns) * 0.02).to(torch.bfloat16)
        copies = [bf16] + [bf16.clone() for _ in range(copies_for(bf16.nbytes, target) - 1)]
        variants = {"bf16": [lambda w=w: kernels.linear_small_batch(x16, w, None) for w in copies]}
        if name == "lm_head":
            head = kernels.QuantLinear(columns, rows, None, "auto")
            head.add_w8(*packing.quantize_w8(bf16.float()))
            variants["w8"] = [lambda: head.forward(x32)]
        else:
            first = w4_layer(kernels, rows, columns)
            w4 = [first] + [w4_layer(kernels, rows, columns) for _ in range(copies_for(first.bytes(), target) - 1)]
            variants["w4"] = [lambda layer=layer: layer.forward(x32) for layer in w4]
            for rank in args.ranks:
                blocks = max(1, round(w4_equal_depth(rank)))
                kinds = [("small_rank", rank), ("lanes_per_rank", 0)] if kernels.has_avx512_vnni() else [("auto", 64)]
                for kind, small_rank_max in kinds:
                    make = lambda: random_bitstack_layer(parts, columns, blocks, "auto", rank,  # noqa: E731
                                                         small_rank_max=small_rank_max)
                    layer = make()
                    layers = [layer] + [make() for _ in range(copies_for(layer.bytes(), target) - 1)]
                    variants[f"rank {rank} {kind}"] = [lambda layer=layer: layer.forward(x32) for layer in layers]
                    # vpdpbusd per call: columns-in-lanes one per 64 columns, row and rank (and as
                    # many sign expansions); lane-per-rank one per 4 columns, row and 16 ranks
                    per_row = (-(-columns // 64) * rank if kind == "small_rank"
                               else -(-columns // 128) * 32 * -(-rank // 16))
                    dpbusd[f"rank {rank} {kind}"] = rows * per_row * blocks
                    results["ranks"].setdefault(str(rank), {"blocks": blocks, "w4_equal_depth": w4_equal_depth(rank)})
        order = list(variants)
        shape_times = {v: [] for v in order}
        for round_index in range(args.rounds):
            if kernels.has_avx512_vnni():
                dpbusd_rates.append(kernels.dpbusd_rate(200000))
            for step in range(args.calls_per_round):
                v = order[(step + round_index) % len(order)]
                calls = variants[v]
                shape_times[v].append(timed(calls[(step // len(order) + round_index) % len(calls)]))
        results["shapes"][name] = {}
        for v, samples in shape_times.items():
            times[(name, v)] = samples
            entry = {"best_ms": min(samples) * 1e3, "median_ms": statistics.median(samples) * 1e3}
            if v in dpbusd and dpbusd_rates:
                entry["dpbusd_per_call"] = dpbusd[v]
                entry["fraction_of_dpbusd_peak"] = dpbusd[v] / min(samples) / max(dpbusd_rates)
            results["shapes"][name][v] = entry
            peak = f" {entry['fraction_of_dpbusd_peak']:.2f} of vpdpbusd peak" if "fraction_of_dpbusd_peak" in entry else ""
            print(f"{name:8s} {v:28s} best {min(samples) * 1e3:8.3f} ms median {statistics.median(samples) * 1e3:8.3f} ms"
                  f"{peak}", flush=True)
        del variants
    best = {key: min(samples) * 1e3 for key, samples in times.items()}
    layer = lambda variant, scale=1.0: sum(best[(n, variant)] for n in LAYER_SHAPES) * scale  # noqa: E731
    bf16 = LAYERS * layer("bf16") + best[("lm_head", "bf16")]
    estimate = {"bf16_ms_per_token": bf16, "w4_ms_per_token": LAYERS * layer("w4") + best[("lm_head", "w8")]}
    estimate["w4 tok_s_ratio_to_bf16"] = bf16 / estimate["w4_ms_per_token"]
    for rank, info in results["ranks"].items():
        for variant in {v for (_, v) in best if v.startswith(f"rank {rank} ")}:
            ms = LAYERS * layer(variant, info["w4_equal_depth"] / info["blocks"]) + best[("lm_head", "w8")]
            estimate[f"{variant} ms_per_token"] = ms
            estimate[f"{variant} tok_s_ratio_to_bf16"] = bf16 / ms
            estimate[f"{variant} projections_time_ratio_to_bf16"] = (
                layer(variant, info["w4_equal_depth"] / info["blocks"]) / layer("bf16"))
    print("whole-model estimate:", {k: round(v, 3) for k, v in sorted(estimate.items())}, flush=True)
    results["model_estimate"] = estimate
    results["dpbusd_rate_best_per_s"] = max(dpbusd_rates) if dpbusd_rates else None
    return results


def rows_section(args, kernels) -> dict:
    parts, columns = LAYER_SHAPES["gate_up"]
    kernel = random_bitstack_layer(parts, columns, args.blocks, "auto", decode_max_rows=1 << 20)
    rebuild = random_bitstack_layer(parts, columns, args.blocks, "reference")
    results = []
    for rows in args.rows:
        x = torch.randn(rows, columns)
        kernel_times, rebuild_times = [], []
        for _ in range(args.repeats):  # alternating
            kernel_times.append(timed(lambda: kernel.forward(x)))
            rebuild_times.append(timed(lambda: rebuild.forward(x)))
        row = {"rows": rows, "kernel_best_ms": min(kernel_times) * 1e3, "rebuild_matmul_best_ms": min(rebuild_times) * 1e3,
               "kernel_median_ms": statistics.median(kernel_times) * 1e3,
               "rebuild_matmul_median_ms": statistics.median(rebuild_times) * 1e3}
        results.append(row)
        print(row, flush=True)
    return {"blocks": args.blocks, "shape": [sum(parts), columns], "results": results}


def resize_section(args, kernels) -> dict:
    depth = max(1, round(w4_equal_depth()))
    layers, blocks = [], []
    for _ in range(LAYERS):
        for parts, columns in LAYER_SHAPES.values():
            layer = random_bitstack_layer(parts, columns, depth, "auto")
            layers.append(layer)
            blocks.append([[(torch.randint(0, 256, (rows, bitstack_packing.packed_columns(columns)), dtype=torch.uint8),
                             (torch.randn(rows, RANK) * 0.1).half(), (torch.randn(RANK, columns) * 0.1).half())
                            for _ in range(depth - 1)] for rows in parts])
    shrink, grow = [], []
    for _ in range(args.repeats):
        shrink.append(timed(lambda: [layer.truncate(p, 1) for layer in layers for p in range(layer.num_parts)]))

        def append_all():
            for layer, part_blocks in zip(layers, blocks):
                for p, stack in enumerate(part_blocks):
                    for signs, u, v in stack:
                        layer.append_block(p, signs, u, v)
        grow.append(timed(append_all))
    result = {"layers": len(layers), "depth": depth, "shrink_to_one_block_ms": statistics.median(shrink) * 1e3,
              "grow_back_ms": statistics.median(grow) * 1e3,
              "bytes_full": sum(layer.bytes() for layer in layers)}
    print(result, flush=True)
    return result


def engine_section(args, kernels) -> dict:
    from bitstack_resize import PRESET, _bytes  # noqa: PLC0415 (benchmark helpers)
    from common import CHECKPOINT_CACHE, random_checkpoint  # noqa: PLC0415
    from common import synthetic_tokenizer  # noqa: PLC0415
    from cpu_decode import FitserveSide, make_prompt  # noqa: PLC0415

    from fitserve import LLM  # noqa: PLC0415
    from fitserve.layers.weight_formats import W4Format  # noqa: PLC0415
    from fitserve.models.config import load_model_config  # noqa: PLC0415
    from fitserve.models.loader import linear_layouts  # noqa: PLC0415
    from fitserve.models.random_checkpoint import write_random_bitstack_checkpoint  # noqa: PLC0415
    from fitserve.models.weight_memory import weight_memory_bytes  # noqa: PLC0415

    bf16_dir = random_checkpoint(PRESET, "bfloat16")
    rank, num_blocks = args.engine_rank, args.engine_blocks
    bitstack_dir = CHECKPOINT_CACHE / f"{PRESET}-bitstack-random-{num_blocks}x{rank}"
    if not (bitstack_dir / "model.safetensors").is_file():
        write_random_bitstack_checkpoint(bitstack_dir, PRESET, num_blocks, rank)
    config = load_model_config(bitstack_dir)
    tokenizer = synthetic_tokenizer(config.vocab_size)
    bf16 = FitserveSide(bf16_dir, "bfloat16", "64MiB", torch.get_num_threads(), tokenizer)
    w4_projections = sum(_bytes(W4Format().part_tensors(part)) for layout in linear_layouts(config)
                         if layout.module_name != "lm_head" for part in layout.parts)
    bitstack = FitserveSide.__new__(FitserveSide)  # its timing methods, with a weight budget
    bitstack.llm = LLM(str(bitstack_dir), tokenizer=str(tokenizer), dtype="bfloat16", kv_cache_memory="64MiB",
                       num_threads=torch.get_num_threads(), enable_prefix_caching=False, weight_memory="400MiB")
    bitstack.engine, bitstack.counter = bitstack.llm.engine, 0
    budget = bitstack.engine.model.elastic_weights.fixed_bytes + w4_projections
    bitstack.engine.set_weight_memory(budget)
    loaded = weight_memory_bytes(bitstack.engine.model)
    prompt = make_prompt(128, config.vocab_size, seed=0)
    steps = {"bf16": [], "bitstack": []}
    for round_index in range(args.repeats):
        for name, side in (("bf16", bf16), ("bitstack", bitstack))[:: 1 if round_index % 2 == 0 else -1]:
            steps[name].extend(side.single_stream(prompt, args.decode_tokens))
    result = {"rank": rank, "stored_blocks": num_blocks, "budget_bytes": budget, "bitstack_loaded_bytes": loaded,
              "decode_tokens": args.decode_tokens, "rounds": args.repeats}
    for name, seconds in steps.items():
        result[f"{name}_step_ms_median"] = statistics.median(seconds) * 1e3
        result[f"{name}_step_ms_p10"] = statistics.quantiles(seconds, n=10)[0] * 1e3
    result["tok_s_ratio_median"] = result["bf16_step_ms_median"] / result["bitstack_step_ms_median"]
    result["tok_s_ratio_p10"] = result["bf16_step_ms_p10"] / result["bitstack_step_ms_p10"]
    print(result, flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["gemv", "ranks", "rows", "resize", "engine"], default="gemv")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="ranks: BitStack ranks")
    parser.add_argument("--shapes", nargs="+", default=[*LAYER_SHAPES, "lm_head"], choices=[*LAYER_SHAPES, "lm_head"])
    parser.add_argument("--blocks", type=int, default=3, help="BitStack blocks per matrix (w4-equal: ~3.1)")
    parser.add_argument("--rounds", type=int, default=7, help="gemv: rounds (a read and vpdpbusd bound each)")
    parser.add_argument("--calls-per-round", type=int, default=40, help="gemv: calls per round, all variants")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 3, 4, 6, 8, 16])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--decode-tokens", type=int, default=32, help="engine: decode steps per run")
    parser.add_argument("--engine-rank", type=int, default=1, help="engine: rank of every block (--rank auto: 1)")
    parser.add_argument("--engine-blocks", type=int, default=8, help="engine: blocks stored per matrix")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kernels = cpu.get()
    if kernels is None:
        print("the CPU kernels are unavailable here (no AVX2 or no compiler)", file=sys.stderr)
        return 1
    sections = {"gemv": gemv_section, "ranks": ranks_section, "rows": rows_section, "resize": resize_section, "engine": engine_section}
    section = sections[args.section](args, kernels)
    result = {"benchmark": "cpu_bitstack_kernels", "section": args.section, "machine": describe_machine(),
              "threads": torch.get_num_threads(),
              "shared_machine_note": "2-core VM shared with other jobs: compare ratios within one run", **section}
    suffix = "" if args.section == "gemv" else f"_{args.section}"
    print("wrote", write_result(f"cpu_bitstack_kernels{suffix}", result, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Micro-benchmarks of the quantized linear layers (fitserve/kernels/cpu_quant_linear.h).

    python benchmarks/cpu_quant_kernels.py                   # one decode row: w4, w8 vs bf16
    python benchmarks/cpu_quant_kernels.py --section rows    # integer kernel vs dequantize+matmul by rows
    python benchmarks/cpu_quant_kernels.py --section prefill # 1024 rows: dequantize+matmul vs bf16/fp32
    python benchmarks/cpu_quant_kernels.py --section batch   # w4 lanes vs w4 row layout vs bf16, 1..64 rows

`gemv`: one row of x against each Qwen2.5-0.5B projection shape (o 896x896, qkv 1152x896,
gate_up 9728x896, down 896x4864, and the 151936x896 LM head, in w8 only as fitserve stores it)
in bf16 through the streaming kernel (`linear_small_batch`), in w8 and in w4 (group 128)
through QuantLinear (AVX-512 VNNI and AVX2 where the CPU runs them; on VNNI in the lanes
layouts and, for comparison, the row layouts). Each variant has enough copies of its weights,
in huge pages as a loaded model's, that every call reads them from memory, as a decode step does; the
variants alternate call by call so a shared machine's bandwidth swings hit all alike, and a
plain read of a large buffer (torch.sum, as benchmarks/cpu_decode.py's read bound) is measured
between rounds. Reported: best and median time per call, effective read bandwidth (bytes stored
/ best time) and its fraction of the best read rate measured in the same run (on a shared
machine the best of many calls is the undisturbed rate; the medians are kept too).

`rows`: 1..96 rows of x against the gate_up shape: the integer kernel against the same layer's
dequantize-then-matmul path (best and median of alternating calls); where the second wins sets
the default decode_max_rows.

`batch`: 1, 8, 32 and 64 rows of x (a batched decode step) against each projection shape of a
layer: bf16 weights through fitserve's vdpbf16ps kernel (`cpu.linear`, bf16 x), w4 (group 128)
in the lanes layout (16 output rows in the vector lanes, the AVX-512 VNNI default) and in the
row layout (`lanes=False`, the previous kernel), and MixLLM's mixture (90% of the rows w4,
10% w8, scattered by out_rows) in both layouts. On CPUs with AMX-INT8 the lanes layers run on
tiles from 16 rows, and the same layers held to the VNNI kernel ("... lanes avx512_vnni") join
the comparison. Weights in cache (one copy) and from memory (copies
beyond the caches), variants alternating call by call; per-layer sums of the best times, and
the lanes kernel's multiply-accumulates per second as a fraction of the vpdpbusd peak measured
in the same run (`dpbusd_rate`, 64 per instruction) and, at one row, its read rate as a fraction
of the read bandwidth measured in the same run.

`prefill`: 1024 rows through each projection shape of one layer: bf16 F.linear (what a bf16
model runs), float32 F.linear, and QuantLinear w4/w8 (dequantize into a float32 slice, then
the matmul library), float32 and bf16 x.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, write_result  # noqa: E402
from cpu_decode import measure_read_bandwidth  # noqa: E402

from fitserve.bench.roofline import memory_test_bytes  # noqa: E402
from fitserve.kernels import cpu  # noqa: E402
from fitserve.models import host_memory  # noqa: E402
from fitserve.quant import packing  # noqa: E402

QWEN_SHAPES = {"o": (896, 896), "qkv": (1152, 896), "gate_up": (9728, 896), "down": (896, 4864),
               "lm_head": (151936, 896)}


def in_huge_pages(tensors) -> list[torch.Tensor]:
    """Copies of `tensors` in one huge-page arena, where fitserve's loader keeps weights
    (fitserve.models.host_memory); ordinary copies where the kernel has no huge pages."""
    arena = host_memory.arena_tensors({str(i): (tuple(t.shape), t.dtype) for i, t in enumerate(tensors)})
    if arena is None:
        return [t.clone() for t in tensors]
    return [arena[str(i)].copy_(t) for i, t in enumerate(tensors)]


def quant_layer(kernels, fmt: str, weight: torch.Tensor, isa: str, group_size: int = 128, **kwargs):
    """A QuantLinear holding `weight` in `fmt` (w8 or w4), in huge pages as a loaded model's."""
    layer = kernels.QuantLinear(weight.shape[1], weight.shape[0], None, isa, **kwargs)
    if fmt == "w8":
        layer.add_w8(*in_huge_pages(packing.quantize_w8(weight)), in_place=True)
    else:
        layer.add_w4(*in_huge_pages(packing.quantize_w4(weight, group_size)), group_size, in_place=True)
    return layer


def copies_for(bytes_per_copy: int, target: int) -> int:
    """How many copies of a weight make a round larger than the caches."""
    return max(1, -(-target // bytes_per_copy))


def gemv_section(args, kernels) -> dict:
    target = memory_test_bytes(torch.device("cpu"))
    isas = ["avx512_vnni", "avx2"] if kernels.has_avx512_vnni() else ["avx2"]
    results = {}
    for name in args.shapes:
        out_features, in_features = QWEN_SHAPES[name]
        weight = torch.randn(out_features, in_features) * 0.02
        variants = {}  # name -> (callables over copies, bytes per call)
        bf16 = weight.to(torch.bfloat16)
        copies = copies_for(bf16.numel() * 2, target)
        bf16_copies = in_huge_pages([bf16] * copies)
        x16 = torch.randn(1, in_features).to(torch.bfloat16)
        variants["bf16 linear_small_batch"] = (
            [lambda w=w: kernels.linear_small_batch(x16, w, None) for w in bf16_copies], bf16.numel() * 2)
        formats = ["w8"] if name == "lm_head" else ["w8", "w4"]
        x32 = torch.randn(1, in_features)
        for fmt in formats:
            for isa in isas:
                # On AVX-512 VNNI: the lanes layout (default) and the row layout it replaced.
                layouts = [True, False] if isa == "avx512_vnni" else [True]
                for lanes in layouts:
                    first = quant_layer(kernels, fmt, weight, isa, lanes=lanes)
                    layers = [first] + [quant_layer(kernels, fmt, weight, isa, lanes=lanes)
                                        for _ in range(copies_for(first.bytes(), target) - 1)]
                    label = f"{fmt} {isa}" if lanes else f"{fmt} {isa} (row layout)"
                    variants[label] = ([lambda layer=layer: layer.forward(x32) for layer in layers], first.bytes())
        del bf16_copies
        times = {v: [] for v in variants}
        reads = []
        order = list(variants)
        for round_index in range(args.rounds):
            reads.append(measure_read_bandwidth(min_time_s=0.05))
            for step in range(args.calls_per_round):
                v = order[(step + round_index) % len(order)]
                calls, _ = variants[v]
                fn = calls[(step // len(order) + round_index) % len(calls)]
                start = time.perf_counter()
                fn()
                times[v].append(time.perf_counter() - start)
        # On a shared machine a call that loses a core to another process waits a whole
        # scheduler slice (~10-20 ms), so medians can measure the neighbours; the best call and
        # the best read are the undisturbed rates, and both are reported.
        read_best, read_median = max(reads), statistics.median(reads)
        shape_result = {"shape": [out_features, in_features], "read_bandwidth_best_bytes_per_s": read_best,
                        "read_bandwidth_median_bytes_per_s": read_median, "variants": {}}
        for v, (_, nbytes) in variants.items():
            best, median = min(times[v]), statistics.median(times[v])
            rate = nbytes / best
            shape_result["variants"][v] = {
                "bytes": nbytes, "calls": len(times[v]), "best_ms": best * 1e3, "median_ms": median * 1e3,
                "p25_ms": statistics.quantiles(times[v], n=4)[0] * 1e3, "best_bytes_per_s": rate,
                "fraction_of_read_best": rate / read_best, "fraction_of_read_median": nbytes / median / read_median}
            print(f"{name:8s} {v:24s} best {best * 1e3:8.3f} ms median {median * 1e3:8.3f} ms "
                  f"{rate / 1e9:6.1f} GB/s = {rate / read_best:5.2f} of best read ({read_best / 1e9:.1f} GB/s)",
                  flush=True)
        results[name] = shape_result
        del variants
    return {"shapes": results}


def best_seconds(fn, repeats: int) -> float:
    fn()
    return min(timed(fn) for _ in range(repeats))


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def rows_section(args, kernels) -> dict:
    out_features, in_features = QWEN_SHAPES[args.rows_shape]
    weight = torch.randn(out_features, in_features) * 0.02
    target = memory_test_bytes(torch.device("cpu"))
    results = []
    for fmt in ("w4", "w8"):
        kernel_layers = [quant_layer(kernels, fmt, weight, "auto", decode_max_rows=1 << 20)]
        kernel_layers += [quant_layer(kernels, fmt, weight, "auto", decode_max_rows=1 << 20)
                          for _ in range(copies_for(kernel_layers[0].bytes(), target) - 1)]
        dequant = quant_layer(kernels, fmt, weight, "reference")
        for rows in args.rows:
            x = torch.randn(rows, in_features)
            kernel_times, dequant_times = [], []
            for repeat in range(args.repeats):  # alternating
                kernel_times.append(timed(lambda: kernel_layers[repeat % len(kernel_layers)].forward(x)))
                dequant_times.append(timed(lambda: dequant.forward(x)))
            row = {"format": fmt, "rows": rows, "kernel_best_ms": min(kernel_times) * 1e3,
                   "dequantize_matmul_best_ms": min(dequant_times) * 1e3,
                   "kernel_median_ms": statistics.median(kernel_times) * 1e3,
                   "dequantize_matmul_median_ms": statistics.median(dequant_times) * 1e3}
            results.append(row)
            print(row, flush=True)
    return {"shape": [out_features, in_features], "results": results}


def mixed_layer(kernels, weight: torch.Tensor, lanes: bool, high_fraction: float = 0.1, group_size: int = 128,
                isa: str = "auto"):
    """MixLLM's layer shape: every tenth output row (salient) in w8, the rest in w4."""
    rows = weight.shape[0]
    high = torch.arange(0, rows, int(round(1 / high_fraction)))
    low = torch.tensor(sorted(set(range(rows)) - set(high.tolist())), dtype=torch.int64)
    layer = kernels.QuantLinear(weight.shape[1], rows, None, isa, 1 << 20, lanes)
    layer.add_w4(*in_huge_pages(packing.quantize_w4(weight[low], group_size)), group_size, low, in_place=True)
    layer.add_w8(*in_huge_pages(packing.quantize_w8(weight[high])), high, in_place=True)
    return layer


def batch_section(args, kernels) -> dict:
    torch.manual_seed(0)
    target = memory_test_bytes(torch.device("cpu"))
    # Short register-only runs, best of many: on a shared core a long one counts the time the
    # neighbours hold it (one thread: the kernels below run on this process's threads alike).
    threads = torch.get_num_threads()
    peak_dpbusd = max(kernels.dpbusd_rate(100000) for _ in range(200)) / threads
    peak_macs = 64 * peak_dpbusd * threads
    shapes = [s for s in args.shapes if s != "lm_head"]
    results: dict = {"dpbusd_per_s_per_thread": peak_dpbusd, "shapes": {}}
    totals: dict = {}
    for name in shapes:
        out_features, in_features = QWEN_SHAPES[name]
        weight = torch.randn(out_features, in_features) * 0.02
        bf16 = weight.to(torch.bfloat16)
        makers = {
            "bf16 kernel": lambda: bf16.clone(),
            "w4 lanes": lambda: quant_layer(kernels, "w4", weight, "auto", decode_max_rows=1 << 20),
            "w4 rows": lambda: quant_layer(kernels, "w4", weight, "auto", decode_max_rows=1 << 20, lanes=False),
            "mixllm lanes": lambda: mixed_layer(kernels, weight, True),
            "mixllm rows": lambda: mixed_layer(kernels, weight, False),
        }
        if kernels.has_amx_int8():  # "lanes" above run on AMX tiles from 16 rows; these never do
            makers["w4 lanes avx512_vnni"] = lambda: quant_layer(kernels, "w4", weight, "avx512_vnni",
                                                                 decode_max_rows=1 << 20)
            makers["mixllm lanes avx512_vnni"] = lambda: mixed_layer(kernels, weight, True, isa="avx512_vnni")
        shape_result = {"shape": [out_features, in_features]}
        for residency in args.batch_residency:
            objects = {}
            for v, make in makers.items():
                first = make()
                nbytes = first.numel() * 2 if v == "bf16 kernel" else first.bytes()
                count = 1 if residency == "cache" else copies_for(nbytes, target)
                objects[v] = ([first] + [make() for _ in range(count - 1)], nbytes)
            read = measure_read_bandwidth(min_time_s=0.05) if residency == "memory" else None
            for rows in args.batch_rows:
                x16 = torch.randn(rows, in_features).to(torch.bfloat16)
                calls = {v: [(lambda w=w: cpu.linear(x16, w, None)) if v == "bf16 kernel"
                             else (lambda layer=w: layer.forward(x16)) for w in objs]
                         for v, (objs, _) in objects.items()}
                times = {v: [] for v in calls}
                order = list(calls)
                for repeat in range(args.repeats * len(order)):
                    v = order[repeat % len(order)]
                    fns = calls[v]
                    times[v].append(timed(fns[(repeat // len(order)) % len(fns)]))
                entry = {v: {"best_ms": min(t) * 1e3, "median_ms": statistics.median(t) * 1e3}
                         for v, t in times.items()}
                vnni = "w4 lanes avx512_vnni" if "w4 lanes avx512_vnni" in times else "w4 lanes"  # not the tiles
                entry[vnni]["fraction_of_dpbusd_peak"] = rows * out_features * in_features / min(times[vnni]) / peak_macs
                if read is not None and rows == 1:
                    for v in ("w4 lanes", "w4 rows"):
                        entry[v]["fraction_of_read_bandwidth"] = objects[v][1] / min(times[v]) / read
                    entry["read_bandwidth_bytes_per_s"] = read
                shape_result.setdefault(residency, {})[str(rows)] = entry
                for v, e in entry.items():
                    if isinstance(e, dict):
                        key = (residency, rows, v)
                        totals[key] = totals.get(key, 0.0) + e["best_ms"]
                print(name, residency, rows, {v: round(e["best_ms"], 3) for v, e in entry.items() if isinstance(e, dict)},
                      "VNNI lanes %.2f of vpdpbusd peak" % entry[vnni]["fraction_of_dpbusd_peak"], flush=True)
            del objects
        results["shapes"][name] = shape_result
    layer: dict = {}
    for (residency, rows, v), ms in totals.items():
        layer.setdefault(residency, {}).setdefault(str(rows), {})[v] = ms
    for residency, by_rows in layer.items():
        for rows, by_variant in by_rows.items():
            base = by_variant["bf16 kernel"]
            by_variant["speedup_over_bf16"] = {v: base / ms for v, ms in list(by_variant.items()) if v != "bf16 kernel"}
            print("layer", residency, rows, {v: round(ms, 3) for v, ms in by_variant.items() if not isinstance(ms, dict)},
                  "x bf16:", {v: round(r, 2) for v, r in by_variant["speedup_over_bf16"].items()}, flush=True)
    results["layer_best_ms"] = layer
    return results


def prefill_section(args, kernels) -> dict:
    rows = args.prefill_rows
    results = {}
    totals: dict[str, float] = {}
    for name in ("qkv", "o", "gate_up", "down"):
        out_features, in_features = QWEN_SHAPES[name]
        weight = torch.randn(out_features, in_features) * 0.02
        x32 = torch.randn(rows, in_features)
        x16 = x32.to(torch.bfloat16)
        w16 = weight.to(torch.bfloat16)
        w4 = quant_layer(kernels, "w4", weight, "auto")
        w8 = quant_layer(kernels, "w8", weight, "auto")
        variants = {
            "bf16 F.linear (bf16 x)": lambda: F.linear(x16, w16),
            "fp32 F.linear": lambda: F.linear(x32, weight),
            "w4 QuantLinear fp32 x": lambda: w4.forward(x32),
            "w4 QuantLinear bf16 x": lambda: w4.forward(x16),
            "w8 QuantLinear fp32 x": lambda: w8.forward(x32),
            "w8 QuantLinear bf16 x": lambda: w8.forward(x16),
        }
        times = {v: [] for v in variants}
        for repeat in range(args.repeats):
            for v in (list(variants)[repeat % len(variants):] + list(variants)[:repeat % len(variants)]):
                times[v].append(timed(variants[v]))
        results[name] = {v: statistics.median(t) * 1e3 for v, t in times.items()}
        for v, ms in results[name].items():
            totals[v] = totals.get(v, 0.0) + ms
        print(name, {v: round(ms, 2) for v, ms in results[name].items()}, flush=True)
    base = totals["bf16 F.linear (bf16 x)"]
    ratios = {v: ms / base for v, ms in totals.items()}
    print("one layer's projections, ms:", {v: round(ms, 2) for v, ms in totals.items()}, flush=True)
    print("ratio to bf16:", {v: round(r, 3) for v, r in ratios.items()}, flush=True)
    return {"rows": rows, "median_ms": results, "layer_total_ms": totals, "ratio_to_bf16": ratios}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--section", choices=["gemv", "rows", "prefill", "batch"], default="gemv")
    parser.add_argument("--shapes", nargs="+", default=list(QWEN_SHAPES), choices=list(QWEN_SHAPES))
    parser.add_argument("--rounds", type=int, default=9, help="gemv: rounds (a read-bound measurement each)")
    parser.add_argument("--calls-per-round", type=int, default=60, help="gemv: calls per round, all variants")
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 48, 64, 96])
    parser.add_argument("--rows-shape", default="gate_up", choices=list(QWEN_SHAPES))
    parser.add_argument("--prefill-rows", type=int, default=1024)
    parser.add_argument("--batch-rows", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--batch-residency", nargs="+", choices=["cache", "memory"], default=["cache", "memory"],
                        help="batch: weights in cache (one copy) and/or from memory (copies past the caches; "
                             "each variant's copies are held at once, which a small machine with a large L3 "
                             "may not fit)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="torch threads (default: the CPUs this process may run on, e.g. 1 under taskset -c 1)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels = cpu.get()
    assert kernels is not None, "the CPU kernels are unavailable here"
    section = {"gemv": gemv_section, "rows": rows_section, "prefill": prefill_section,
               "batch": batch_section}[args.section]
    result = section(args, kernels)
    path = write_result(f"cpu_quant_kernels_{args.section}",
                        {"benchmark": "cpu_quant_kernels", "section": args.section, "machine": describe_machine(),
                         "threads": torch.get_num_threads(), "shared_machine_note":
                         "2-core VM shared with other jobs: compare ratios within one run", **result}, args.out)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

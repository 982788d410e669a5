"""Micro-benchmarks of the CPU linear paths.

    python benchmarks/cpu_kernels.py                    # by rows of x, gate_up of Qwen2.5-0.5B
    python benchmarks/cpu_kernels.py --section pages    # one decode row, 4 KiB vs 2 MiB pages
    python benchmarks/cpu_kernels.py --section dot      # batched decode rows: kernels vs the library
    python benchmarks/cpu_kernels.py --section decode-attention   # one sequence: kernel vs torch SDPA

`rows`: where the weight-streaming kernel stops beating the matmul library (sets
fitserve.kernels.cpu.SMALL_BATCH_ROWS). `pages`: the read bandwidth of one decode row over
all decoder projections of a model shape (larger than the caches, as in a real decode step),
with the weights in ordinary memory and in transparent huge pages (fitserve.models.
host_memory), next to torch.sum over both kinds of memory. The variants alternate layer by
layer, so a shared machine's bandwidth swings hit all of them alike. `dot`: bf16 projections
of 1-64 rows (a batched decode step) through the matmul library (on a float32 copy of the
weight where the CPU lacks bf16 arithmetic), the streaming kernel and, on AVX512-BF16 CPUs,
the vdpbf16ps kernel, on eight copies of each weight so that every call reads it from
memory, as a decode step does. `decode-attention`: one sequence's decode attention per layer
over the paged bf16 caches of every layer of a model shape, fitserve's kernel against torch's
`scaled_dot_product_attention` on the sequence's gathered blocks, with a read of one layer's
weight bytes between layers (in a decode step the weights stream through the caches between
two layers' attention, so the K/V come from memory).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, write_result  # noqa: E402

from fitserve.bench.roofline import ModelShape  # noqa: E402
from fitserve.kernels import cpu  # noqa: E402
from fitserve.models import host_memory  # noqa: E402
from fitserve.models.random_checkpoint import PRESETS  # noqa: E402


def best_seconds(fn, min_time_s: float = 0.5) -> float:
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_time_s:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best


def rows_section(args) -> dict:
    kernels = cpu.get()
    assert kernels is not None, "the CPU kernels are unavailable here"
    weight32 = torch.randn(args.out_features, args.in_features)
    weight16 = weight32.to(torch.bfloat16)
    results = []
    for rows in args.rows:
        x32 = torch.randn(rows, args.in_features)
        x16 = x32.to(torch.bfloat16)
        paths = {
            "torch fp32 (MKL)": lambda: F.linear(x32, weight32),
            "torch bf16": lambda: F.linear(x16, weight16),
            "kernel bf16 weights": lambda: kernels.linear_small_batch(x16, weight16, None),
            "kernel fp32 weights": lambda: kernels.linear_small_batch(x32, weight32, None),
            "widen bf16 then MKL": lambda: F.linear(x16.float(), weight16.float()).to(torch.bfloat16),
        }
        row = {"rows": rows}
        for name, fn in paths.items():
            seconds = best_seconds(fn)
            row[name] = {"ms": seconds * 1e3, "gflops": 2 * rows * weight32.numel() / seconds / 1e9}
        results.append(row)
        print(rows, {k: round(v["ms"], 2) for k, v in row.items() if k != "rows"}, flush=True)
    return {"shape": [args.out_features, args.in_features], "results": results}


def pages_section(args) -> dict:
    kernels = cpu.get()
    assert kernels is not None, "the CPU kernels are unavailable here"
    assert host_memory.huge_pages_available(), "this kernel offers no transparent huge pages"
    shape = ModelShape.from_config(PRESETS[args.preset], torch.bfloat16)
    hidden, inter, q_size = shape.hidden_size, shape.intermediate_size, shape.num_heads * shape.head_dim
    qkv = q_size + 2 * shape.num_kv_heads * shape.head_dim
    shapes = [(qkv, hidden), (hidden, q_size), (2 * inter, hidden), (hidden, inter)]
    layers = shape.num_layers
    names = {f"{layer}.{index}": shape for layer in range(layers) for index, shape in enumerate(shapes)}
    plain = {name: torch.randn(shape).to(torch.bfloat16) for name, shape in names.items()}
    huge = host_memory.arena_views(names, torch.bfloat16)
    for name, tensor in plain.items():
        huge[name].copy_(tensor)
    layer_bytes = sum(rows * cols * 2 for rows, cols in shapes)
    inputs = {cols: torch.randn(1, cols).to(torch.bfloat16) for _, cols in shapes}
    # torch.sum reads one layer's worth of a buffer as large as all layers, a different slice
    # per layer, so its reads come from memory too (one layer fits in a large L3).
    slice_floats = layer_bytes // 4
    sum_plain = torch.ones(layers, slice_floats)
    sum_huge = host_memory.huge_page_buffer(layers * slice_floats * 4).view(torch.float32).view(layers, -1).fill_(1.0)
    variants = {
        "kernel, 4 KiB pages": lambda layer: [kernels.linear_small_batch(inputs[w.shape[1]], w, None)
                                              for w in (plain[f"{layer}.{i}"] for i in range(4))],
        "kernel, 2 MiB pages": lambda layer: [kernels.linear_small_batch(inputs[w.shape[1]], w, None)
                                              for w in (huge[f"{layer}.{i}"] for i in range(4))],
        "torch.sum, 4 KiB pages": lambda layer: sum_plain[layer].sum(),
        "torch.sum, 2 MiB pages": lambda layer: sum_huge[layer].sum(),
    }
    seconds = dict.fromkeys(variants, 0.0)
    done = dict.fromkeys(variants, 0)
    order = list(variants)
    for sweep in range(args.sweeps):
        for layer in range(layers):
            name = order[(layer + sweep) % len(order)]
            start = time.perf_counter()
            variants[name](layer)
            seconds[name] += time.perf_counter() - start
            done[name] += 1
    results = {name: done[name] * layer_bytes / seconds[name] for name in variants}
    for name, rate in results.items():
        print(f"{name:24s} {rate / 1e9:6.1f} GB/s", flush=True)
    return {"preset": args.preset, "layer_bytes": layer_bytes, "sweeps": args.sweeps,
            "read_bytes_per_s": results}


def dot_section(args) -> dict:
    kernels = cpu.get()
    assert kernels is not None, "the CPU kernels are unavailable here"
    native = cpu.cpu_has_native_bf16()
    results = []
    for out_features, in_features in ((args.out_features, args.in_features), (args.in_features, args.out_features // 2)):
        weights = [torch.randn(out_features, in_features).to(torch.bfloat16) for _ in range(8)]
        scratch = cpu.MatmulScratch()
        for rows in args.rows:
            x = torch.randn(rows, in_features).to(torch.bfloat16)
            paths = {
                "kernel streaming": lambda w: kernels.linear_small_batch(x, w, None),
            }
            if kernels.has_avx512_bf16():
                paths["kernel vdpbf16ps"] = lambda w: kernels.linear_bf16_dot(x, w, None)
            if native:
                paths["torch bf16 (oneDNN)"] = lambda w: F.linear(x, w)
            else:  # what the library needs here: the weight widened, then a float32 matmul
                paths["torch float32 on widened weight"] = (
                    lambda w: F.linear(x.float(), scratch.widen(w)).to(x.dtype))
            row = {"shape": [out_features, in_features], "rows": rows}
            for name, fn in paths.items():
                seconds = best_seconds(lambda: [fn(w) for w in weights]) / len(weights)
                row[name] = {"ms": seconds * 1e3, "gflops": 2 * rows * out_features * in_features / seconds / 1e9,
                             "weight_gb_per_s": out_features * in_features * 2 / seconds / 1e9}
            results.append(row)
            print(out_features, in_features, rows,
                  {k: round(v["ms"], 3) for k, v in row.items() if isinstance(v, dict)}, flush=True)
    return {"results": results}


def decode_attention_section(args) -> dict:
    kernels = cpu.get()
    assert kernels is not None, "the CPU kernels are unavailable here"
    results = []
    for preset in args.presets:
        shape = ModelShape.from_config(PRESETS[preset], torch.bfloat16)
        heads, kv_heads, head_dim, layers = shape.num_heads, shape.num_kv_heads, shape.head_dim, shape.num_layers
        # A layer's bf16 weights, at most 64 MiB (twice a large L3): read between two layers.
        flush_floats = min(shape.layer_matmul_params * 2, 64 << 20) // 4
        flush = torch.ones(2, flush_floats)
        for context in args.contexts:
            block_size = 16
            blocks = -(-context // block_size)
            # The sequence's blocks scattered over a cache four times its size, as a busy cache is.
            table = torch.randperm(4 * blocks)[:blocks].to(torch.int32).view(1, -1)
            caches = [(torch.randn(4 * blocks, block_size, kv_heads, head_dim).to(torch.bfloat16),
                       torch.randn(4 * blocks, block_size, kv_heads, head_dim).to(torch.bfloat16)) for _ in range(layers)]
            query = torch.randn(1, heads, head_dim).to(torch.bfloat16)
            out = torch.empty_like(query)
            lengths = torch.tensor([context], dtype=torch.int32)
            rows = torch.zeros(1, dtype=torch.long)
            scale = head_dim**-0.5
            index = table[0].long()

            def fitserve_kernel(key_cache, value_cache):
                kernels.paged_decode_attention(query, key_cache, value_cache, table, lengths, rows, out, scale)

            def torch_sdpa(key_cache, value_cache):
                keys = key_cache.index_select(0, index).flatten(0, 1)[:context].transpose(0, 1)  # [Hkv, L, D]
                values = value_cache.index_select(0, index).flatten(0, 1)[:context].transpose(0, 1)
                F.scaled_dot_product_attention(query.transpose(0, 1), keys, values, scale=scale, enable_gqa=True)

            variants = {"fitserve kernel": fitserve_kernel, "torch sdpa (gathered)": torch_sdpa}
            seconds = dict.fromkeys(variants, 0.0)
            order = list(variants)
            for sweep in range(args.attention_sweeps):
                for layer in range(layers):
                    name = order[(layer + sweep) % len(order)]
                    flush[layer % 2].sum()
                    start = time.perf_counter()
                    variants[name](*caches[layer])
                    seconds[name] += time.perf_counter() - start
            calls = args.attention_sweeps * layers / len(variants)
            row = {"preset": preset, "context": context, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
                   **{name: {"us_per_layer": seconds[name] / calls * 1e6} for name in variants}}
            row["speedup_vs_torch"] = seconds["torch sdpa (gathered)"] / seconds["fitserve kernel"]
            results.append(row)
            print(preset, context, {name: round(row[name]["us_per_layer"], 1) for name in variants},
                  f"x{row['speedup_vs_torch']:.2f}", flush=True)
    return {"avx512_bf16": bool(kernels.has_avx512_bf16()), "results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--section", choices=["rows", "pages", "dot", "decode-attention"], default="rows")
    parser.add_argument("--out-features", type=int, default=2 * 4864)
    parser.add_argument("--in-features", type=int, default=896)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--preset", default="qwen2.5-0.5b", choices=sorted(PRESETS),
                        help="model shape of the pages section")
    parser.add_argument("--sweeps", type=int, default=200, help="passes over the layers in the pages section")
    parser.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b", "llama-3-8b"],
                        choices=sorted(PRESETS), help="model shapes of the decode-attention section")
    parser.add_argument("--contexts", type=int, nargs="+", default=[160, 512, 2048],
                        help="sequence lengths of the decode-attention section")
    parser.add_argument("--attention-sweeps", type=int, default=6, help="passes over the layers per context")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sections = {"rows": rows_section, "pages": pages_section, "dot": dot_section,
                "decode-attention": decode_attention_section}
    body = sections[args.section](args)
    name = {"rows": "cpu_kernels", "pages": f"cpu_kernels_pages_{args.preset}", "dot": "cpu_kernels_dot",
            "decode-attention": "cpu_kernels_decode_attention"}[args.section]
    write_result(name, {"benchmark": "cpu_kernels", "section": args.section, "machine": describe_machine(),
                        "torch": torch.__version__, **body},
                 args.out or Path(__file__).resolve().parent / "results" / f"{name}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

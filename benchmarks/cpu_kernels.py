"""Micro-benchmark of the CPU linear paths by rows of x: where the weight-streaming kernel
stops beating the matmul library (sets fitserve.kernels.cpu.SMALL_BATCH_ROWS).

    python benchmarks/cpu_kernels.py            # gate_up shape of Qwen2.5-0.5B
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

from fitserve.kernels import cpu  # noqa: E402


def best_seconds(fn, min_time_s: float = 0.5) -> float:
    fn()
    best, spent = float("inf"), 0.0
    while spent < min_time_s:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out-features", type=int, default=2 * 4864)
    parser.add_argument("--in-features", type=int, default=896)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16, 24, 32, 48, 64])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
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
    write_result("cpu_kernels", {"benchmark": "cpu_kernels", "machine": describe_machine(),
                                 "shape": [args.out_features, args.in_features], "results": results},
                 args.out or Path(__file__).resolve().parent / "results" / "cpu_kernels.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

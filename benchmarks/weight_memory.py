"""Resident memory after loading a model, dense against its quantized copies, written to JSON.

Each model loads in a fresh process (so nothing freed by an earlier one is counted), with a
16 MiB KV cache. A process that imports fitserve, builds the CPU kernels and runs one tiny
step of the bundled model is the fixed overhead (torch, the kernels, the allocator), subtracted
from every row. Random weights with Qwen2.5-0.5B's shape, quantized by `fitserve quantize`
(mixllm's channels drawn at random: memory does not depend on which).

    python benchmarks/weight_memory.py [--preset qwen2.5-0.5b]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import quantized_checkpoint, random_checkpoint

RESULTS = Path(__file__).resolve().parent / "results"

_PROBE = """
import json, sys, psutil
from fitserve import LLM, SamplingParams
model = sys.argv[1] or None
llm = LLM(model, dtype="bfloat16", kv_cache_memory="16MiB", num_threads=2)
llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=2))
from fitserve.models.weight_memory import weight_memory_bytes
print(json.dumps({"rss_bytes": psutil.Process().memory_info().rss,
                  "weight_bytes": weight_memory_bytes(llm.engine.model)}))
"""


def probe(model: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _PROBE, model], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    dense = random_checkpoint(args.preset, "bfloat16")
    baseline = probe("")  # the bundled 9 M-parameter model: imports, kernels, allocator
    rows = []
    for label, model_dir in [("bfloat16", dense)] + [(m, quantized_checkpoint(dense, m)) for m in ("w8", "w4", "mixllm")]:
        result = probe(str(model_dir))
        result["rss_above_overhead_bytes"] = result["rss_bytes"] - baseline["rss_bytes"]
        rows.append({"format": label, **result})
        print(json.dumps(rows[-1]), flush=True)
    dense_row = rows[0]
    for row in rows:
        row["rss_share_of_bf16"] = row["rss_above_overhead_bytes"] / dense_row["rss_above_overhead_bytes"]
        row["weight_share_of_bf16"] = row["weight_bytes"] / dense_row["weight_bytes"]
        # The bound: resident memory <= the format's share of the dense model's
        # (weights beyond the fixed overhead) plus that fixed overhead.
        row["bound_bytes"] = row["weight_share_of_bf16"] * dense_row["rss_above_overhead_bytes"] + baseline["rss_bytes"]
        row["within_bound"] = row["rss_bytes"] <= row["bound_bytes"]
    out = args.out or RESULTS / f"weight_memory_{args.preset}.json"
    import torch

    from fitserve.bench.environment import cpu_model

    out.write_text(json.dumps({"preset": args.preset, "cpu": cpu_model(),
                               "torch": torch.__version__, "overhead_process": baseline, "kv_cache": "16MiB",
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

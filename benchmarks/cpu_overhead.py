"""fitserve's decode step at 32 running requests, split into its parts (a quick companion of
cpu_decode.py's overhead section): schedule, runner tensor building, forward, logits,
sampling, update + detokenize (synthetic word-level tokenizer of the model's vocabulary).

    python benchmarks/cpu_overhead.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import describe_machine, random_checkpoint, write_result  # noqa: E402
from common import synthetic_tokenizer  # noqa: E402
from cpu_decode import FitserveSide, overhead_summary, serve_workload  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = random_checkpoint(args.preset, "bfloat16")
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    side = FitserveSide(model_dir, args.dtype, "1GiB", args.threads, synthetic_tokenizer(vocab_size))
    # Short prompts and 24 outputs each: most steps are decodes of all 32 requests.
    workload = serve_workload(32, vocab_size, seed=0, input_range=(64, 64), output_range=(24, 24))
    side.serve(workload[:4])  # warm-up
    result = side.serve(workload, breakdown=True)
    summary = overhead_summary(result["steps"], 32)
    print(json.dumps(summary, indent=2))
    out = args.out or Path(__file__).resolve().parent / "results" / f"cpu_overhead_{args.preset}.json"
    write_result("cpu_overhead", {"benchmark": "cpu_overhead", "machine": describe_machine(),
                                  "model": {"preset": args.preset, "dtype": args.dtype, "weights": "random"},
                                  "threads": args.threads, "workload": "32 requests, 64 prompt + 24 output tokens",
                                  "decode_step_at_32": summary}, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

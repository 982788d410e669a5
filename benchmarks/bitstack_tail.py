"""Why BitStack's held-out curve rises past w8's memory on the bundled model: held-out and
calibration perplexity along the default (calibrated) order, from w8's memory to the full stack.

If the calibration text's perplexity keeps falling towards the original while the held-out
perplexity rises, the deep blocks are doing their job (restoring the original weights) and
the rise is the original's own gap between its training text and held-out text, which the
truncated stack partly closes; no block order can make the curve non-increasing then, as the
full stack is fixed.

    python benchmarks/bitstack_tail.py    # ~12 min on one busy core
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch

from fitserve.bench.environment import cpu_model
from fitserve.config import default_model_dir
from fitserve.models.loader import load_model
from fitserve.quant.bitstack_evaluate import BitStackModel, model_windows
from fitserve.quant.bitstack_quantize import BitStackOptions
from fitserve.quant.calibration import CALIBRATION_SEQUENCE_TOKENS, calibration_samples, default_calibration_text
from fitserve.quant.evaluate import perplexity
from fitserve.quant.quantize import DEFAULT_CALIBRATION_TOKENS, quantize_model

RESULTS = Path(__file__).resolve().parent / "results"
W8_BYTES = 9347712
"""fitserve w8's weight memory on the bundled model (benchmarks/results/bitstack_quality.json)."""


def calibration_windows(model_dir: Path) -> list[list[int]]:
    """The samples `fitserve quantize` calibrates on by default (its training files here)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(default_calibration_text(model_dir).text, add_special_tokens=False).ids
    return calibration_samples(ids, DEFAULT_CALIBRATION_TOKENS, CALIBRATION_SEQUENCE_TOKENS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--points", type=int, default=6, help="budgets from w8's memory to the full stack")
    parser.add_argument("--out", type=Path, default=RESULTS / "bitstack_tail.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = default_model_dir()
    sets = {"heldout": model_windows(model_dir), "calibration": calibration_windows(model_dir)}
    original, _ = load_model(model_dir, torch.float32, torch.device("cpu"), "torch", huge_pages=False)
    rows = [{"model": "float32 original", **{f"perplexity_{k}": perplexity(original, w) for k, w in sets.items()}}]
    print(json.dumps(rows[-1]), flush=True)
    with tempfile.TemporaryDirectory() as work:
        options = BitStackOptions(curve_points=0)
        quantize_model(model_dir, Path(work) / "bitstack", "bitstack", force=True, progress=False, bitstack=options)
        stacked = BitStackModel(Path(work) / "bitstack")
        _, full = stacked.budget_range()
        for i in range(args.points):
            budget = W8_BYTES + (full - W8_BYTES) * i // (args.points - 1)
            held = stacked.load_budget(budget)
            rows.append({"model": "bitstack (defaults)", "budget_bytes": budget, "weight_bytes": held,
                         **{f"perplexity_{k}": perplexity(stacked.stand_in.model, w) for k, w in sets.items()}})
            print(json.dumps(rows[-1]), flush=True)
    result = {"machine": {"cpu": cpu_model(), "threads": args.threads, "python": platform.python_version(),
                          "torch": torch.__version__, "note": "2-core machine shared with other work"},
              "finished": time.strftime("%Y-%m-%d %H:%M:%S"), "ordering": options.ordering,
              "ordering_tokens": options.ordering_tokens,
              "windows": {k: len(w) for k, w in sets.items()}, "rows": rows}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

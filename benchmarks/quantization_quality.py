"""Quality and size of fitserve's weight formats, side by side, written to JSON.

1. The bundled model (fitserve-tiny): every format made by `fitserve quantize`, held-out
   perplexity by the model card's protocol (all of heldout.txt, and the card's 16-window test
   subset), float32 activations, next to the dense original; MixLLM's salience next to the
   same fraction of randomly chosen channels (mean of 3 draws).
2. Random models with the shapes of Qwen2.5-0.5B and Llama-3.2-1B (bf16): each format's
   bits per weight, size on disk and `fitserve quantize` time on this machine (mixllm with
   its default 8192 calibration tokens of Python source, tokenized with the bundled model's
   tokenizer: the ids are valid in the larger vocabularies; quality is meaningless on random
   weights, time and size are not).

    python benchmarks/quantization_quality.py                    # everything
    python benchmarks/quantization_quality.py --skip-random-models
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

from fitserve.bench.environment import cpu_model
from fitserve.config import default_model_dir
from fitserve.models.config import load_model_config
from fitserve.models.loader import linear_layouts, load_model
from fitserve.models.random_checkpoint import write_random_checkpoint
from fitserve.quant.evaluate import heldout_windows, perplexity
from fitserve.quant.quantize import quantize_model
from fitserve.quant.salience import select_random

RESULTS = Path(__file__).resolve().parent / "results"


def bundled_rows(work: Path, full: bool) -> list[dict]:
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    windows = heldout_windows(tokenizer.encode((model_dir / "heldout.txt").read_text(encoding="utf-8"),
                                               add_special_tokens=False).ids)
    subsets = {"heldout": windows, "subset16": windows[:16]} if full else {"subset16": windows[:16]}

    def measure(name: str, directory: Path, summary=None) -> dict:
        model, _ = load_model(directory, torch.float32, torch.device("cpu"), "torch")
        row = {"method": name, **{f"perplexity_{key}": perplexity(model, ws) for key, ws in subsets.items()}}
        if summary is not None:
            row.update(bits_per_weight=summary.linear_bits_per_weight, model_bits_per_weight=summary.model_bits_per_weight,
                       size_bytes=summary.size_bytes, quantize_seconds=summary.seconds)
        else:
            row.update(bits_per_weight=32.0, size_bytes=sum(p.stat().st_size for p in model_dir.glob("*.safetensors")))
        print(json.dumps(row), flush=True)
        return row

    rows = [measure("float32 (original)", model_dir)]
    for method, options in [("w8", {}), ("w4", {}), ("mixllm", {})]:
        out = work / method
        summary = quantize_model(model_dir, out, method, force=True, progress=False, **options)
        rows.append(measure(method, out, summary))
    config = load_model_config(model_dir)
    parts = [part for layout in linear_layouts(config) if layout.module_name != "lm_head" for part in layout.parts]
    random_rows = []
    for seed in range(3):
        out = work / f"random{seed}"
        summary = quantize_model(model_dir, out, "mixllm", force=True, progress=False,
                                 high_channels=select_random(parts, 0.1, seed))
        random_rows.append(measure(f"mixllm, random 10% of channels (seed {seed})", out, summary))
    rows.extend(random_rows)
    original = rows[0]
    for row in rows:
        for key in subsets:
            row[f"increase_{key}"] = row[f"perplexity_{key}"] - original[f"perplexity_{key}"]
    return rows


def random_model_rows(work: Path, presets: list[str]) -> list[dict]:
    rows = []
    for preset in presets:
        dense = write_random_checkpoint(work / preset, preset, dtype="bfloat16", seed=0)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(default_model_dir() / name, dense / name)
        original = sum(p.stat().st_size for p in dense.glob("*.safetensors"))
        rows.append({"model": preset, "method": "bfloat16 (original)", "size_bytes": original, "bits_per_weight": 16.0})
        for method in ("w8", "w4", "mixllm"):
            summary = quantize_model(dense, work / f"{preset}-{method}", method, force=True, progress=False)
            rows.append({"model": preset, "method": method, "bits_per_weight": summary.linear_bits_per_weight,
                         "model_bits_per_weight": summary.model_bits_per_weight, "size_bytes": summary.size_bytes,
                         "quantize_seconds": summary.seconds})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(work / f"{preset}-{method}")
        shutil.rmtree(dense)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-random-models", action="store_true")
    parser.add_argument("--subset-only", action="store_true", help="only the card's 16-window subset (faster)")
    parser.add_argument("--presets", nargs="+", default=["qwen2.5-0.5b", "llama-3.2-1b"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "quantization_quality.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"machine": {"cpu": cpu_model(), "threads": args.threads, "python": platform.python_version(),
                          "torch": torch.__version__}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    with tempfile.TemporaryDirectory() as work:
        result["bundled_model"] = bundled_rows(Path(work), not args.subset_only)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        if not args.skip_random_models:
            result["random_models"] = random_model_rows(Path(work), args.presets)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

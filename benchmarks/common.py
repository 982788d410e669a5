"""Shared pieces of the benchmark scripts: machine description, checkpoints, result files.

Every result file says what was measured and where: hardware, software versions, model
shape, dtype and workload, so a number can be reproduced or put in context later.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from fitserve.bench.environment import cpu_model, gpu_driver_version

RESULTS_DIR = Path(__file__).resolve().parent / "results"
CHECKPOINT_CACHE = Path(os.environ.get("FITSERVE_BENCH_CACHE", Path.home() / ".cache" / "fitserve-bench"))



def describe_machine() -> dict[str, Any]:
    """Hardware and software versions, for the header of every result file."""
    import transformers

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        # What torch's (and fitserve's kernels') vector code may use: "AVX2" on an AVX-512
        # machine where ATEN_CPU_CAPABILITY=avx2 measures the AVX2 paths.
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "transformers": transformers.__version__,
        "platform": platform.platform(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        info["fitserve_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=Path(__file__).resolve().parent, check=False,
        ).stdout.strip() or None
    except OSError:
        info["fitserve_commit"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        info["gpu_driver"] = gpu_driver_version()
        info["cuda"] = torch.version.cuda
    try:
        info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        info["triton"] = None
    return info


def random_checkpoint(preset: str, dtype: str, num_layers: int | None = None) -> Path:
    """A random-weight checkpoint with a real model's shapes, written once and reused."""
    from fitserve.models.random_checkpoint import write_random_checkpoint

    name = f"{preset}-{dtype}" + (f"-{num_layers}l" if num_layers else "")
    out_dir = CHECKPOINT_CACHE / name
    if not (out_dir / "model.safetensors").exists() and not (out_dir / "model.safetensors.index.json").exists():
        overrides = {"num_hidden_layers": num_layers} if num_layers else None
        write_random_checkpoint(out_dir, preset, dtype=dtype, seed=0, overrides=overrides)
    return out_dir


def quantized_checkpoint(model_dir: Path, method: str) -> Path:
    """`fitserve quantize` of the random checkpoint, cached beside it."""
    from fitserve.models.config import load_model_config
    from fitserve.models.loader import linear_layouts
    from fitserve.quant.quantize import quantize_model
    from fitserve.quant.salience import select_random

    out = model_dir.parent / f"{model_dir.name}-{method}"
    if not (out / "model.safetensors").is_file():
        options = {}
        if method == "mixllm":
            layouts = linear_layouts(load_model_config(model_dir))
            parts = [part for layout in layouts if layout.module_name != "lm_head" for part in layout.parts]
            options["high_channels"] = select_random(parts, 0.1, seed=0)
        quantize_model(model_dir, out, method, force=True, progress=False, **options)
    return out


def synthetic_tokenizer(vocab_size: int) -> Path:
    """A word-level tokenizer with the model's vocabulary size (token i is "w{i}")."""
    out_dir = CHECKPOINT_CACHE / f"wordlevel-tokenizer-{vocab_size}"
    if (out_dir / "tokenizer.json").exists():
        return out_dir
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="w0").save_pretrained(str(out_dir))
    return out_dir


def summarize(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": len(values),
    }


def write_result(name: str, result: dict[str, Any], out: Path | None = None) -> Path:
    path = out or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path

"""`fitserve quantize`: turn a dense Hugging Face checkpoint into a quantized model directory.

The output is a Hugging Face-style directory (the tokenizer, generation and chat-template
files copied, config.json with a `quantization_config`, one model.safetensors) that every
fitserve command loads like any model. Decoder projections take the chosen format; the LM head
(for tied models, the embedding matrix they share) is stored in w8 unless `lm_head="dense"`;
norms and biases stay in the checkpoint's dtype.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from fitserve.layers.weight_formats import FormatPlan, FormatPlanError, PartShape, QUANTIZATION_METHODS
from fitserve.models.config import load_model_config
from fitserve.models.loader import (
    EMBEDDING, _check_checkpoint, _index_checkpoint, checkpoint_files, expected_checkpoint_tensors, linear_layouts,
)
from fitserve.quant import packing
from fitserve.quant.bitstack_quantize import BitStackOptions, build_bitstack, check_options
from fitserve.quant.bitstack_quantize import write_config as write_bitstack_config
from fitserve.quant.calibration import (
    CALIBRATION_SEQUENCE_TOKENS, CalibrationText, calibration_samples, default_calibration_text,
    read_calibration_file,
)
from fitserve.quant.salience import channel_salience, select_salient

DEFAULT_CALIBRATION_TOKENS = 8192


class QuantizeError(ValueError):
    """A `fitserve quantize` request that cannot be carried out; says what to change."""


@dataclass
class QuantizeSummary:
    method: str
    out_dir: str
    linear_bits_per_weight: float
    """Stored bits per weight of the decoder projections (scales and zeros counted)."""
    model_bits_per_weight: float
    """Stored bits per parameter of the whole model, LM head, embedding and norms included."""
    size_bytes: int
    """model.safetensors on disk."""
    original_size_bytes: int
    seconds: float
    calibration: str | None = None
    high_precision_fraction: float | None = None
    smallest_loadable_bytes: int | None = None
    """bitstack: weight memory of the smallest loadable model (block 0 of every matrix)."""
    full_stack_bytes: int | None = None
    """bitstack: weight memory with every block loaded."""
    ordering: str | None = None
    """bitstack: how the global block order was made (measured or residual)."""
    ranks: str | None = None
    """bitstack: the ranks chosen, e.g. "16 (all)" or "4: 30 matrices, 8: 12 matrices"."""

    def describe(self) -> str:
        ratio = self.size_bytes / self.original_size_bytes
        text = (f"{self.method}: {self.linear_bits_per_weight:.2f} bits per weight in the projections, "
                f"{self.model_bits_per_weight:.2f} over the whole model; {self.size_bytes / 2**20:.1f} MiB on disk "
                f"({ratio:.0%} of {self.original_size_bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s -> {self.out_dir}")
        if self.calibration:
            text += f"\ncalibration: {self.calibration}"
        if self.full_stack_bytes is not None:
            text += (f"\nweight memory from {self.smallest_loadable_bytes / 2**20:.2f} MiB (block 0 of every matrix) "
                     f"to {self.full_stack_bytes / 2**20:.2f} MiB (full stack); block order: {self.ordering}; "
                     f"ranks: {self.ranks}")
        return text


def _prepare_out_dir(model_dir: Path, out_dir: Path, force: bool) -> None:
    if out_dir.resolve() == model_dir.resolve():
        raise QuantizeError("--out must differ from the model directory")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        if not force:
            raise QuantizeError(f"{out_dir} already exists; choose another --out or pass --force to replace it")
        if out_dir.is_dir():
            shutil.rmtree(out_dir)
        else:
            out_dir.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


def _calibration_token_ids(model_dir: Path, calibration_data: Path | None) -> tuple[list[int], CalibrationText]:
    from tokenizers import Tokenizer

    text = read_calibration_file(calibration_data) if calibration_data else default_calibration_text(model_dir)
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return tokenizer.encode(text.text, add_special_tokens=False).ids, text


def quantize_model(model_dir: str | Path, out_dir: str | Path, method: str, group_size: int = 128,
                   high_precision_fraction: float = 0.10, lm_head: str = "w8",
                   calibration_data: str | Path | None = None,
                   num_calibration_tokens: int = DEFAULT_CALIBRATION_TOKENS, force: bool = False,
                   high_channels: dict[str, list[int]] | None = None, progress: bool = True,
                   bitstack: BitStackOptions | None = None) -> QuantizeSummary:
    """Write a quantized copy of `model_dir` to `out_dir` (see the module docstring).

    mixllm chooses its high-precision channels from calibration gradients, unless
    `high_channels` gives them (tests compare salience with random choices that way).
    bitstack takes its settings from `bitstack` (defaults: BitStackOptions()).
    """
    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if method not in QUANTIZATION_METHODS:
        raise QuantizeError(f"unknown method {method!r}; use one of {', '.join(QUANTIZATION_METHODS)}")
    if not 0 <= high_precision_fraction <= 1:
        raise QuantizeError(f"--high-precision-fraction must be in [0, 1] (got {high_precision_fraction})")
    if num_calibration_tokens < 1:
        raise QuantizeError(f"--num-calibration-tokens must be positive (got {num_calibration_tokens})")
    config = load_model_config(model_dir)
    if "quantization_config" in config.extra:
        raise QuantizeError(f"{model_dir} is already quantized; quantize its dense original")
    layouts = linear_layouts(config)
    parts = [part for layout in layouts if layout.module_name != "lm_head" for part in layout.parts]
    if method == "bitstack":
        try:
            check_options(bitstack or BitStackOptions())
        except ValueError as error:
            raise QuantizeError(str(error)) from error
    if method in ("w4", "mixllm"):
        for width in sorted({part.in_features for part in parts}):
            try:
                packing.check_group_size(width, group_size)
            except ValueError as error:
                divisors = [size for size in (32, 64, 128, 256) if width % size == 0]
                raise QuantizeError(f"{error}; use --group-size {divisors[-1] if divisors else 'an even divisor'} "
                                    f"(every projection's input width must be a multiple)") from error
    found = _index_checkpoint(checkpoint_files(model_dir))
    _check_checkpoint(config, expected_checkpoint_tensors(config), found, model_dir)
    _prepare_out_dir(model_dir, out_dir, force)

    if method == "bitstack":
        return _quantize_bitstack(model_dir, out_dir, config, found, bitstack or BitStackOptions(), lm_head,
                                  calibration_data, num_calibration_tokens, progress, started)
    calibration_source = None
    if method == "mixllm" and high_channels is None:
        ids, text = _calibration_token_ids(model_dir, Path(calibration_data) if calibration_data else None)
        samples = calibration_samples(ids, num_calibration_tokens, CALIBRATION_SEQUENCE_TOKENS)
        calibration_source = f"{text.source}; {len(samples)} samples of {len(samples[0])} tokens"
        salience = channel_salience(model_dir, parts, samples, group_size, _bar(samples, "calibration", progress))
        high_channels = select_salient(salience, parts, high_precision_fraction)
    try:
        plan = FormatPlan(method=method, group_size=group_size, lm_head=lm_head, high_channels=high_channels or {},
                          prequantized=True)
    except FormatPlanError as error:
        raise QuantizeError(str(error)) from error

    tensors, linear_bytes, linear_weights = _quantized_tensors(config, plan, found, progress)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    summary_extra = {"calibration": calibration_source} if calibration_source else {}
    if method == "mixllm":
        summary_extra["high_precision_fraction"] = high_precision_fraction
    plan.extra = summary_extra
    _write_config(model_dir, out_dir, plan)
    _copy_side_files(model_dir, out_dir)
    parameters = sum(math.prod(found[name][1]) for name in expected_checkpoint_tensors(config))
    size = (out_dir / "model.safetensors").stat().st_size
    return QuantizeSummary(
        method=method, out_dir=str(out_dir), linear_bits_per_weight=8 * linear_bytes / linear_weights,
        model_bits_per_weight=8 * size / parameters, size_bytes=size,
        original_size_bytes=sum(path.stat().st_size for path in checkpoint_files(model_dir)),
        seconds=time.perf_counter() - started, calibration=calibration_source,
        high_precision_fraction=high_precision_fraction if method == "mixllm" else None,
    )


def _quantize_bitstack(model_dir: Path, out_dir: Path, config, found: dict, options: BitStackOptions, lm_head: str,
                       calibration_data: str | Path | None, num_calibration_tokens: int, progress: bool,
                       started: float) -> QuantizeSummary:
    ids, text = _calibration_token_ids(model_dir, Path(calibration_data) if calibration_data else None)
    samples = calibration_samples(ids, num_calibration_tokens, CALIBRATION_SEQUENCE_TOKENS)
    calibration_source = f"{text.source}; {len(samples)} samples of {len(samples[0])} tokens"
    result = build_bitstack(model_dir, config, found, samples, options, lm_head, progress)
    result.quantization_config["calibration"] = calibration_source
    save_file(result.tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_bitstack_config(model_dir, out_dir, result.quantization_config)
    _copy_side_files(model_dir, out_dir)
    parameters = sum(math.prod(found[name][1]) for name in expected_checkpoint_tensors(config))
    size = (out_dir / "model.safetensors").stat().st_size
    ranks = Counter(result.quantization_config["ranks"].values())
    return QuantizeSummary(
        method="bitstack", out_dir=str(out_dir), linear_bits_per_weight=8 * result.linear_bytes / result.linear_weights,
        model_bits_per_weight=8 * size / parameters, size_bytes=size,
        original_size_bytes=sum(path.stat().st_size for path in checkpoint_files(model_dir)),
        seconds=time.perf_counter() - started, calibration=calibration_source,
        smallest_loadable_bytes=result.smallest_bytes, full_stack_bytes=result.full_bytes, ordering=options.ordering,
        ranks=", ".join(f"{rank}: {count} matrices" for rank, count in sorted(ranks.items())),
    )


def _bar(items, description: str, enabled: bool):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit="sample" if description == "calibration" else "matrix")


def _quantized_tensors(config, plan: FormatPlan, found: dict, progress: bool) -> tuple[dict, int, int]:
    """Every output tensor, read from the dense checkpoint one matrix at a time."""
    part_formats: dict[str, tuple[PartShape, object]] = {}
    for layout in linear_layouts(config):
        weight_format = plan.head_format() if layout.module_name == "lm_head" else plan.linear_format()
        for part in layout.parts:
            part_formats[f"{part.prefix}.weight"] = (part, weight_format)
    head_format = plan.head_format()
    if config.tie_word_embeddings and not head_format.is_dense:
        part_formats[f"{EMBEDDING}.weight"] = (PartShape(EMBEDDING, config.vocab_size, config.hidden_size),
                                               head_format)
    out: dict[str, torch.Tensor] = {}
    linear_bytes = linear_weights = 0
    names = [name for name in expected_checkpoint_tensors(config)]
    for name in _bar(names, "quantizing", progress):
        path = found[name][0]
        with safe_open(str(path), framework="pt") as file:
            tensor = file.get_tensor(name)
        if name not in part_formats or part_formats[name][1].is_dense:
            out[name] = tensor.contiguous()
            continue
        part, weight_format = part_formats[name]
        quantized = weight_format.quantize_part(tensor.float(), part)
        for suffix, value in quantized.items():
            out[f"{part.prefix}.{suffix}"] = value.contiguous()
        if part.prefix not in (EMBEDDING, "lm_head"):
            linear_bytes += sum(value.numel() * value.element_size() for value in quantized.values())
            linear_weights += part.rows * part.in_features
    return out, linear_bytes, linear_weights


def _write_config(model_dir: Path, out_dir: Path, plan: FormatPlan) -> None:
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = plan.to_config()
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")


_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ggml", ".onnx")
_SIDE_FILE_LIMIT = 64 * 2**20


def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config, chat template and the other small non-weight files, so the
    directory stands on its own; weights in any format (safetensors, .bin, GGUF, ...), their
    index, files over 64 MiB and the model card (it describes the dense model) are not copied."""
    skipped = {"config.json", "model.safetensors.index.json", "README.md", "eval.json"}
    for path in model_dir.iterdir():
        if (path.is_file() and path.suffix not in _WEIGHT_SUFFIXES and path.name not in skipped
                and path.stat().st_size <= _SIDE_FILE_LIMIT):
            shutil.copy2(path, out_dir / path.name)


def summary_dict(summary: QuantizeSummary) -> dict:
    return asdict(summary)

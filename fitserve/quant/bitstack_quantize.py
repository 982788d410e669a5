"""`fitserve quantize --method bitstack`: a dense checkpoint into BitStack's elastic format.

Steps: input magnitudes of every projection on calibration text (activation_scales); each
projection decomposed into `num_blocks` residual blocks of its rank (bitstack.decompose, the
columns scaled by the magnitudes); the global load order of the blocks (bitstack_order:
the calibrated proxy by default, or measured on calibration text, or the residual proxy);
then model.safetensors with the stacked blocks (bitstack_packing's layout), the LM head /
embedding as in the other formats, and config.json's quantization_config (block order, ranks
and, for a model that ships a heldout.txt, a held-out perplexity curve over budgets that the
start-up banner interpolates).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fitserve.layers.weight_formats import FormatPlan, PartShape
from fitserve.models.config import ModelConfig
from fitserve.models.loader import EMBEDDING, expected_checkpoint_tensors, linear_layouts, load_model
from fitserve.quant import bitstack_budget, bitstack_order, bitstack_packing, packing
from fitserve.quant.activation_scales import column_scales, input_magnitudes
from fitserve.quant.bitstack import choose_rank, decompose
from fitserve.quant.bitstack_standin import Stack, StandIn
from fitserve.quant.bitstack_evaluate import model_windows
from fitserve.quant.evaluate import perplexity
from fitserve.quant.methods import BITSTACK_ORDERINGS

DEFAULT_NUM_BLOCKS = 16
DEFAULT_RANK = "auto"
AUTO_RANK_CANDIDATES = (1, 2, 4, 8, 16)
ORDERING_TOKENS = 2048
"""Calibration tokens each loss of the calibrated and measured orderings is taken on (the
first windows of the calibration samples); benchmarks/bitstack_quality.py measured the
published curve with this value."""
CURVE_POINTS = 9
CURVE_WINDOWS = 16
"""The perplexity curve in quantization_config is measured on the model card's 16-window
subset of heldout.txt (the full file takes minutes per point on two cores)."""


@dataclass
class BitStackOptions:
    """The settings of `fitserve quantize --method bitstack` (the CLI flags' values)."""

    num_blocks: int = DEFAULT_NUM_BLOCKS
    rank: int | str = DEFAULT_RANK
    """Rank of every block's factors, or "auto": per matrix, the candidate rank with the most
    activation-weighted residual reduction per byte (bitstack.choose_rank)."""
    ordering: str = "calibrated"
    """How blocks are valued (bitstack_order): calibrated, measured or residual."""
    ordering_tokens: int = ORDERING_TOKENS
    """calibrated, measured: calibration tokens per loss (the first windows of the calibration samples)."""
    alpha: float = 0.5
    """Exponent of the input magnitudes in the column scales (activation_scales.column_scales)."""
    curve_points: int = CURVE_POINTS
    """Budgets of the held-out perplexity curve, measured when the model ships heldout.txt
    (0: none; at least 2 otherwise: the smallest and the full model)."""
    curve_windows: int = CURVE_WINDOWS
    """512-token windows of heldout.txt the curve is measured on (its first ones)."""


@dataclass
class BitStackResult:
    """What build_bitstack made: the tensors and quantization_config to write, and the sizes
    the summary reports (weight bytes of the smallest loadable and the full model)."""

    tensors: dict[str, torch.Tensor]
    quantization_config: dict
    smallest_bytes: int
    full_bytes: int
    linear_bytes: int
    linear_weights: int


def check_options(options: BitStackOptions) -> None:
    """ValueError with the flag to fix for options that cannot be used."""
    if options.num_blocks < 1:
        raise ValueError(f"--num-blocks must be at least 1 (got {options.num_blocks})")
    if options.rank != "auto" and (not isinstance(options.rank, int) or options.rank < 1):
        raise ValueError(f"--rank must be a positive integer or 'auto' (got {options.rank!r})")
    if options.ordering_tokens < 2:
        raise ValueError(f"ordering_tokens must be at least 2 (got {options.ordering_tokens})")
    if options.curve_windows < 1:
        raise ValueError(f"curve_windows must be at least 1 (got {options.curve_windows})")
    if options.curve_points == 1 or options.curve_points < 0:
        raise ValueError(f"curve_points must be 0 or at least 2 (got {options.curve_points})")
    if options.ordering not in BITSTACK_ORDERINGS:
        raise ValueError(f"--ordering must be one of {', '.join(BITSTACK_ORDERINGS)} (got {options.ordering!r})")


def _bar(items: Iterable, description: str, enabled: bool, unit: str) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=description, unit=unit)


def projection_parts(config: ModelConfig) -> list[PartShape]:
    """The decoder projections BitStack decomposes (not the LM head, kept as w8 or dense)."""
    return [part for layout in linear_layouts(config) if layout.module_name != "lm_head" for part in layout.parts]


def _fixed_tensors(config: ModelConfig, found: dict, head: str, parts: list[PartShape]) -> dict[str, torch.Tensor]:
    """Every tensor but the projections: norms and biases as stored, embedding / LM head in the
    head format (w8 int8 + row scales, or dense)."""
    plan = FormatPlan(method="w8", lm_head=head, prequantized=True)
    head_format = plan.head_format()
    projections = {f"{part.prefix}.weight" for part in parts}
    out: dict[str, torch.Tensor] = {}
    for name in expected_checkpoint_tensors(config):
        if name in projections:
            continue
        path = found[name][0]
        with safe_open(str(path), framework="pt") as file:
            tensor = file.get_tensor(name)
        head_part = name in (f"{EMBEDDING}.weight", "lm_head.weight") and (
            name == "lm_head.weight" or config.tie_word_embeddings)
        if head_part and not head_format.is_dense:
            prefix = name.rsplit(".", 1)[0]
            for suffix, value in head_format.quantize_part(tensor.float(), PartShape(prefix, *tensor.shape)).items():
                out[f"{prefix}.{suffix}"] = value.contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def _stand_in(model_dir: Path, fixed: dict[str, torch.Tensor], stacks: dict[str, Stack]) -> StandIn:
    """The dense original in float32 with the head / embedding as they are stored (dequantized)."""
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"), "torch", huge_pages=False)
    with torch.inference_mode():
        for prefix, module in ((EMBEDDING, model.model.embed_tokens), ("lm_head", model.lm_head)):
            if f"{prefix}.qweight" in fixed:
                module.weight.copy_(packing.dequantize_w8(fixed[f"{prefix}.qweight"], fixed[f"{prefix}.scales"]))
    return StandIn(model, stacks)


def _tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def build_bitstack(model_dir: Path, config: ModelConfig, found: dict, samples: list[list[int]],
                   options: BitStackOptions, head: str, progress: bool) -> BitStackResult:
    """Decompose, order and (optionally) measure the curve; the tensors to write and the config."""
    parts = projection_parts(config)
    prefixes = [part.prefix for part in parts]
    magnitudes = input_magnitudes(model_dir, prefixes, samples, _bar(samples, "calibration", progress, "sample"))
    stacks: dict[str, Stack] = {}
    energies: dict[str, list[float]] = {}
    for part in _bar(parts, "decomposing", progress, "matrix"):
        with safe_open(str(found[f"{part.prefix}.weight"][0]), framework="pt") as file:
            weight = file.get_tensor(f"{part.prefix}.weight").float()
        scales = column_scales(magnitudes[part.prefix], options.alpha)
        rank = (choose_rank(weight, scales, magnitudes[part.prefix], options.num_blocks, AUTO_RANK_CANDIDATES)
                if options.rank == "auto" else options.rank)
        stacks[part.prefix] = Stack(*decompose(weight, scales, options.num_blocks, rank))
        energies[part.prefix] = bitstack_order.stack_energies(weight, stacks[part.prefix], magnitudes[part.prefix])
    fixed = _fixed_tensors(config, found, head, parts)
    sizes = {prefix: stack.block_bytes() for prefix, stack in stacks.items()}
    stand_in = None
    if options.ordering == "residual":
        values = bitstack_order.residual_values(energies)
    else:
        stand_in = _stand_in(model_dir, fixed, stacks)
        levels = bitstack_order.CALIBRATED_LEVELS if options.ordering == "calibrated" else None
        values = bitstack_order.measured_values(stand_in, first_tokens(samples, options.ordering_tokens),
                                                lambda depths: _bar(depths, "ordering", progress, "depth"), levels)
        if options.ordering == "calibrated":
            values = bitstack_order.calibrated_values(values, energies)
    order = bitstack_order.merge_order(values, sizes)
    fixed_bytes = _tensor_bytes(fixed.values())
    smallest, full = bitstack_budget.budget_range(fixed_bytes, sizes, {p: s.num_blocks for p, s in stacks.items()})
    quantization_config = {
        "quant_method": "fitserve", "method": "bitstack", "num_blocks": options.num_blocks,
        "ranks": {prefix: stack.rank for prefix, stack in stacks.items()}, "block_order": order,
        "lm_head": head, "ordering": options.ordering, "activation_alpha": options.alpha,
    }
    heldout = model_dir / "heldout.txt"
    if options.curve_points and heldout.is_file():
        stand_in = stand_in or _stand_in(model_dir, fixed, stacks)
        windows = model_windows(model_dir)[:options.curve_windows]
        quantization_config["perplexity_curve"] = perplexity_curve(stand_in, order, sizes, fixed_bytes, windows,
                                                                   options.curve_points, progress)
        quantization_config["perplexity_curve_windows"] = f"first {len(windows)} 512-token windows of heldout.txt"
    tensors = dict(fixed)
    for prefix, stack in stacks.items():
        for suffix, value in zip(bitstack_packing.TENSOR_SUFFIXES, (stack.signs, stack.u, stack.v), strict=True):
            tensors[f"{prefix}.{suffix}"] = value.contiguous()
    return BitStackResult(tensors, quantization_config, smallest, full,
                          linear_bytes=full - fixed_bytes,
                          linear_weights=sum(part.rows * part.in_features for part in parts))


def first_tokens(samples: list[list[int]], tokens: int) -> list[list[int]]:
    """The leading windows of `samples` holding `tokens` tokens (the last one cut to fit)."""
    out, left = [], tokens
    for sample in samples:
        if left < 2:
            break
        out.append(sample[:left])
        left -= len(out[-1])
    return out


def curve_counts(total_blocks: int, points: int) -> list[int]:
    """`points` prefix lengths of the order from 0 (smallest model) to all blocks, evenly spaced."""
    return sorted({round(total_blocks * i / (points - 1)) for i in range(points)})


def perplexity_curve(stand_in: StandIn, order: list[str], sizes: dict[str, int], fixed_bytes: int,
                     windows: list[list[int]], points: int, progress: bool) -> list[list[float]]:
    """[[weight bytes, held-out perplexity], ...] at `points` budgets from smallest to full."""
    curve = []
    for count in _bar(curve_counts(len(order), points), "perplexity curve", progress, "budget"):
        stand_in.set_depths(bitstack_budget.depths_for(order, count, list(stand_in.stacks)))
        curve.append([bitstack_budget.loaded_bytes(order, sizes, fixed_bytes, count),
                      round(perplexity(stand_in.model, windows), 4)])
    return curve


def write_config(model_dir: Path, out_dir: Path, quantization_config: dict) -> None:
    """config.json of the original with the BitStack quantization_config added."""
    raw = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    raw["quantization_config"] = quantization_config
    (out_dir / "config.json").write_text(json.dumps(raw, indent=2) + "\n", encoding="utf-8")

"""MixLLM's global choice of high-precision output channels.

The salience of output channel c of a weight matrix is the loss change its 4-bit rounding is
expected to cause, estimated from calibration data and summed over samples:

    s_c = sum over samples of | g_c . d_c + 1/2 (g_c . d_c)^2 |

with d_c the channel's rounding error (w4 dequantized minus original) and g_c the gradient of
the sample's loss with respect to the channel's weights: the first-order Taylor term plus the
Fisher approximation of the second-order one. Channels of all layers compete in one ranking,
so layers that matter more get more 8-bit channels (MixLLM's point against per-layer
fractions). Promoting a channel costs bits in proportion to its input width, so the ranking is
by salience per weight, and the budget is a fraction of all weights.

Gradients come from Hugging Face transformers in float32 (the project's reference
implementation of the architectures), one calibration sample at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path

import torch

from fitserve.layers.weight_formats import PartShape
from fitserve.quant import packing


def rounding_errors(weights: dict[str, torch.Tensor], group_size: int) -> dict[str, torch.Tensor]:
    """w4 round-to-nearest error (dequantized - original) of each matrix, float32."""
    errors = {}
    for prefix, weight in weights.items():
        qweight, scales, zeros = packing.quantize_w4(weight, group_size)
        errors[prefix] = packing.dequantize_w4(qweight, scales, zeros, group_size) - weight.float()
    return errors


def channel_salience(model_dir: Path, parts: list[PartShape], samples: list[list[int]], group_size: int,
                     progress: Iterable | None = None) -> dict[str, torch.Tensor]:
    """Salience [rows] of every output channel of every matrix in `parts` (see module doc)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    parameters = dict(model.named_parameters())
    for parameter in parameters.values():
        parameter.requires_grad_(False)
    matrices = {part.prefix: parameters[f"{part.prefix}.weight"] for part in parts}
    for matrix in matrices.values():
        matrix.requires_grad_(True)
    errors = rounding_errors({prefix: matrix.detach() for prefix, matrix in matrices.items()}, group_size)
    salience = {prefix: torch.zeros(matrix.shape[0], dtype=torch.float64) for prefix, matrix in matrices.items()}
    for sample in progress if progress is not None else samples:
        ids = torch.tensor([sample])
        for matrix in matrices.values():
            matrix.grad = None
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        with torch.no_grad():
            for prefix, matrix in matrices.items():
                first_order = (matrix.grad * errors[prefix]).sum(dim=1).double()
                salience[prefix] += (first_order + 0.5 * first_order**2).abs()
    return salience


def _budget(parts: list[PartShape], fraction: float) -> float:
    return fraction * sum(part.rows * part.in_features for part in parts)


def select_salient(salience: dict[str, torch.Tensor], parts: list[PartShape], fraction: float) -> dict[str, list[int]]:
    """The most salient channels across all matrices, by salience per weight, until they
    hold `fraction` of all weights. Sorted row indices per matrix prefix."""
    width = {part.prefix: part.in_features for part in parts}
    scores = torch.cat([salience[part.prefix] / width[part.prefix] for part in parts])
    owners = torch.cat([torch.full((part.rows,), index) for index, part in enumerate(parts)])
    rows = torch.cat([torch.arange(part.rows) for part in parts])
    costs = torch.tensor([parts[int(owner)].in_features for owner in owners], dtype=torch.float64)
    order = torch.argsort(scores, descending=True, stable=True)
    taken = torch.cumsum(costs[order], 0) <= _budget(parts, fraction) + 0.5
    chosen: dict[str, list[int]] = {part.prefix: [] for part in parts}
    for index in order[taken].tolist():
        chosen[parts[int(owners[index])].prefix].append(int(rows[index]))
    return {prefix: sorted(indices) for prefix, indices in chosen.items()}


def select_random(parts: list[PartShape], fraction: float, seed: int) -> dict[str, list[int]]:
    """Channels drawn uniformly at random under the same weight budget (the baseline that
    salience must beat)."""
    generator = random.Random(seed)
    candidates = [(part.prefix, row, part.in_features) for part in parts for row in range(part.rows)]
    generator.shuffle(candidates)
    budget, used = _budget(parts, fraction), 0
    chosen: dict[str, list[int]] = {part.prefix: [] for part in parts}
    for prefix, row, cost in candidates:
        if used + cost > budget + 0.5:
            continue
        chosen[prefix].append(row)
        used += cost
    return {prefix: sorted(indices) for prefix, indices in chosen.items()}

"""mixllm: MixLLM's global mixed precision — most output channels in w4, the most salient
ones (chosen across all layers by `fitserve quantize`) in w8, in one fused layer.

Per checkpoint part (e.g. q_proj): the w4 tensors (`qweight`, `scales`, `zeros`) of its
low-precision rows in their original order, and the w8 tensors (`qweight_hp`, `scales_hp`)
of its high-precision rows in the order quantization_config lists their indices. The fused
layer multiplies both and writes every output to its original column (`low_rows`,
`high_rows`), so no permutation leaks out of the layer.

The 4-bit rows are quantized with a per-group clipping-range search (fitserve.quant.clipping),
as MixLLM's peers refine round-to-nearest: on the bundled model it cuts mixllm's perplexity
increase at 10% high precision from 0.61x to 0.25x of plain w4's (same channels).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fitserve.layers.weight_formats.base import LinearKernel, PartShape, TensorSpec, WeightFormat
from fitserve.layers.weight_formats.quantized_kernels import (integer_kernel, w4_part, w4_tensors_as_stored, w8_part,
                                                              w8_tensors_as_stored)
from fitserve.layers.weight_formats.w4 import DEFAULT_GROUP_SIZE, w4_part_tensors
from fitserve.quant import packing
from fitserve.quant.clipping import search_w4

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear


HIGH_TENSOR_NAMES = ("qweight_hp", "scales_hp")
"""The w8 tensors of the high-precision rows."""


def split_rows(rows: int, high: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(low-precision rows, high-precision rows) of one part, as int64 row indices."""
    high_rows = torch.tensor(high, dtype=torch.int64)
    is_low = torch.ones(rows, dtype=torch.bool)
    is_low[high_rows] = False
    return torch.nonzero(is_low).flatten(), high_rows


class MixedFormat(WeightFormat):
    """w4 rows plus w8 rows in one layer. `high_channels` maps each part's prefix (as in the
    checkpoint, e.g. "model.layers.0.mlp.gate_proj") to its high-precision row indices."""

    name = "mixllm"

    def __init__(self, high_channels: dict[str, list[int]], group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.high_channels = high_channels
        self.group_size = group_size

    def _high(self, part: PartShape) -> list[int]:
        return self.high_channels.get(part.prefix, [])

    def part_tensors(self, part: PartShape) -> dict[str, TensorSpec]:
        packing.check_group_size(part.in_features, self.group_size)
        high = len(self._high(part))
        specs = w4_part_tensors(part.rows - high, part.in_features, self.group_size)
        specs["qweight_hp"] = TensorSpec((high, part.in_features), torch.int8)
        specs["scales_hp"] = TensorSpec((high,), torch.float32)
        return specs

    def quantize_part(self, weight: torch.Tensor, part: PartShape) -> dict[str, torch.Tensor]:
        low_rows, high_rows = split_rows(part.rows, self._high(part))
        qweight, scales, zeros = search_w4(weight[low_rows], self.group_size)
        qweight_hp, scales_hp = packing.quantize_w8(weight[high_rows])
        return {"qweight": qweight, "scales": scales, "zeros": zeros, "qweight_hp": qweight_hp,
                "scales_hp": scales_hp}

    def load_parts(self, layer: Linear, parts: list[tuple[PartShape, dict[str, torch.Tensor]]],
                   device: torch.device) -> None:
        low_rows, high_rows, offset = [], [], 0
        for part, _ in parts:
            low, high = split_rows(part.rows, self._high(part))
            low_rows.append(low + offset)
            high_rows.append(high + offset)
            offset += part.rows
        for name in ("qweight", "scales", "zeros", "qweight_hp", "scales_hp"):
            layer.set_tensor(name, torch.cat([tensors[name] for _, tensors in parts]).to(device).contiguous())
        layer.set_tensor("low_rows", torch.cat(low_rows).to(device))
        layer.set_tensor("high_rows", torch.cat(high_rows).to(device))

    def dequantize(self, layer: Linear) -> torch.Tensor:
        weight = torch.empty(layer.out_features, layer.in_features, device=layer.qweight.device)
        weight[layer.low_rows] = packing.dequantize_w4(*w4_tensors_as_stored(layer, self.group_size), self.group_size)
        weight[layer.high_rows] = packing.dequantize_w8(*w8_tensors_as_stored(layer, HIGH_TENSOR_NAMES))
        return weight

    def tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {name: getattr(layer, name) for name in ("qweight", "scales", "zeros", "qweight_hp", "scales_hp")}

    def make_kernel(self, layer: Linear) -> LinearKernel:
        parts = []
        if layer.low_rows.numel():
            parts.append(w4_part(layer, layer.low_rows, self.group_size))
        if layer.high_rows.numel():
            parts.append(w8_part(layer, layer.high_rows, HIGH_TENSOR_NAMES))
        return integer_kernel(layer, parts, self.reference_kernel(layer))

    def config_entry(self) -> dict:
        return {"method": self.name, "bits": 4, "high_precision_bits": 8, "group_size": self.group_size}

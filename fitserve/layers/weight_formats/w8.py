"""w8: int8 weights, symmetric, one float32 scale per output channel (round to nearest)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fitserve.layers.weight_formats.base import LinearKernel, PartShape, TensorSpec, WeightFormat
from fitserve.layers.weight_formats.quantized_kernels import integer_kernel, w8_part, w8_tensors_as_stored
from fitserve.quant import packing

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear


class W8Format(WeightFormat):
    """`qweight` int8 [out, in] and `scales` float32 [out] (fitserve.quant.packing)."""

    name = "w8"

    def part_tensors(self, part: PartShape) -> dict[str, TensorSpec]:
        return {"qweight": TensorSpec((part.rows, part.in_features), torch.int8),
                "scales": TensorSpec((part.rows,), torch.float32)}

    def quantize_part(self, weight: torch.Tensor, part: PartShape) -> dict[str, torch.Tensor]:
        qweight, scales = packing.quantize_w8(weight)
        return {"qweight": qweight, "scales": scales}

    def load_parts(self, layer: Linear, parts: list[tuple[PartShape, dict[str, torch.Tensor]]],
                   device: torch.device) -> None:
        for name in ("qweight", "scales"):
            layer.set_tensor(name, torch.cat([tensors[name] for _, tensors in parts]).to(device).contiguous())

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return packing.dequantize_w8(*w8_tensors_as_stored(layer))

    def tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        """As held: `qweight` in the lanes layout once the AVX-512 VNNI kernel repacked it."""
        return {"qweight": layer.qweight, "scales": layer.scales}

    def make_kernel(self, layer: Linear) -> LinearKernel:
        return integer_kernel(layer, [w8_part(layer, None)], self.reference_kernel(layer))

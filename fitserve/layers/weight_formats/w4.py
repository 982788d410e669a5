"""w4: 4-bit weights, asymmetric, a float16 scale and a 4-bit zero per group of input columns."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fitserve.layers.weight_formats.base import LinearKernel, PartShape, TensorSpec, WeightFormat
from fitserve.layers.weight_formats.quantized_kernels import integer_kernel, w4_part, w4_tensors_as_stored
from fitserve.quant import packing

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear

DEFAULT_GROUP_SIZE = 128


def w4_part_tensors(rows: int, in_features: int, group_size: int) -> dict[str, TensorSpec]:
    """Checkpoint tensors of `rows` output rows in w4 (shared with the mixed format)."""
    groups = in_features // group_size
    return {"qweight": TensorSpec((rows, in_features // 2), torch.uint8),
            "scales": TensorSpec((rows, groups), torch.float16),
            "zeros": TensorSpec((rows, groups), torch.uint8)}


class W4Format(WeightFormat):
    """`qweight` uint8 [out, in/2], `scales` float16 and `zeros` uint8 [out, in/group]
    (layout in fitserve.quant.packing). 4.19 bits per weight at groups of 128."""

    name = "w4"

    def __init__(self, group_size: int = DEFAULT_GROUP_SIZE) -> None:
        self.group_size = group_size

    def part_tensors(self, part: PartShape) -> dict[str, TensorSpec]:
        packing.check_group_size(part.in_features, self.group_size)
        return w4_part_tensors(part.rows, part.in_features, self.group_size)

    def quantize_part(self, weight: torch.Tensor, part: PartShape) -> dict[str, torch.Tensor]:
        qweight, scales, zeros = packing.quantize_w4(weight, self.group_size)
        return {"qweight": qweight, "scales": scales, "zeros": zeros}

    def load_parts(self, layer: Linear, parts: list[tuple[PartShape, dict[str, torch.Tensor]]],
                   device: torch.device) -> None:
        for name in ("qweight", "scales", "zeros"):
            layer.set_tensor(name, torch.cat([tensors[name] for _, tensors in parts]).to(device).contiguous())

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return packing.dequantize_w4(*w4_tensors_as_stored(layer, self.group_size), self.group_size)

    def tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        """As held: in the lanes layout once the AVX-512 VNNI kernel repacked them (`Linear.held_layouts`)."""
        return {"qweight": layer.qweight, "scales": layer.scales, "zeros": layer.zeros}

    def make_kernel(self, layer: Linear) -> LinearKernel:
        return integer_kernel(layer, [w4_part(layer, None, self.group_size)], self.reference_kernel(layer))

    def config_entry(self) -> dict:
        return {"method": self.name, "bits": 4, "group_size": self.group_size}

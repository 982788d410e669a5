"""Dense float weights (float32, bfloat16, float16): the format of every Hugging Face checkpoint."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.weight_formats.base import LinearKernel, PartShape, TensorSpec, WeightFormat

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear


class DenseFormat(WeightFormat):
    """`weight` [out, in] in the model's dtype. The loader fills it in place (parts of a fused
    layer are row ranges of it, copied straight from the checkpoint into huge pages), so
    `load_parts` only serves formats converted from dense ones."""

    name = "dense"
    is_dense = True

    def part_tensors(self, part: PartShape) -> dict[str, TensorSpec]:
        return {"weight": TensorSpec((part.rows, part.in_features))}

    def quantize_part(self, weight: torch.Tensor, part: PartShape) -> dict[str, torch.Tensor]:
        return {"weight": weight}

    def load_parts(self, layer: Linear, parts: list[tuple[PartShape, dict[str, torch.Tensor]]],
                   device: torch.device) -> None:
        weight = torch.cat([tensors["weight"] for _, tensors in parts]).to(device)
        layer.weight = torch.nn.Parameter(weight, requires_grad=False)
        layer.invalidate()

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return layer.weight.detach().float()

    def tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        return {"weight": layer.weight}

    def make_kernel(self, layer: Linear) -> LinearKernel:
        # Rows decide between streaming kernel and matmul library on every call
        # (cpu_kernels.linear); Linear.forward calls it directly for dense weights.
        return lambda x: cpu_kernels.linear(x, layer.weight, layer.bias, layer.scratch)

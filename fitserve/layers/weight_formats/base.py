"""The seam for weight formats: what every way of storing a linear layer's weight provides.

A linear layer of fitserve may be fused from several checkpoint matrices (q/k/v into one
qkv projection, gate/up into one): a *part* is one checkpoint matrix, a row block of the
fused layer's output. A format says which tensors one part has in a checkpoint
(`part_tensors`), builds the fused layer's tensors from the parts (`load_parts`) or from a
float weight (`quantize`), reports its stored bytes, gives back the float weight it stands
for (`dequantize`, the reference every kernel is tested against), and chooses once, when the
layer is ready, the function that multiplies activations by it (`make_kernel`).

Learned from vLLM's QuantizeMethodBase (create/load/apply per format), llama.cpp's per-type
table of dot products and converters, and gpt-fast's module swap.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear

LinearKernel = Callable[[torch.Tensor], torch.Tensor]
"""x [rows, in_features] -> x @ W.T (+ bias) [rows, out_features] in x's dtype."""


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of one checkpoint tensor (dtype None: the model's floating dtype)."""

    shape: tuple[int, ...]
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class PartShape:
    """One checkpoint matrix of a (possibly fused) layer: its name prefix (e.g.
    "model.layers.0.self_attn.q_proj"), output rows and the layer's input width."""

    prefix: str
    rows: int
    in_features: int


class WeightFormat(ABC):
    """How one linear layer's weight is stored and multiplied. One instance per layer kind;
    formats with per-layer data (MixLLM's channel choice) get one instance per layer."""

    name: str = ""
    """Method name as written in quantization_config and accepted by `--quantization`."""
    is_dense: bool = False
    """Dense float weights: the loader fills them in place, the fused decode stack reads them."""
    reads_own_tensors: bool = False
    """The format reads its checkpoint tensors itself, only as far as it needs them (elastic
    weights, which load a budget's worth of blocks and more later): the loader reads none of
    them and calls `attach_source` instead of `load_parts`."""

    @abstractmethod
    def part_tensors(self, part: PartShape) -> dict[str, TensorSpec]:
        """Checkpoint tensors of one part, by suffix ("weight", "qweight", "scales", ...)."""

    @abstractmethod
    def quantize_part(self, weight: torch.Tensor, part: PartShape) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one part made from its float weight [rows, in_features]
        (round to nearest, or with the format's own rule); what `fitserve quantize` writes."""

    @abstractmethod
    def load_parts(self, layer: Linear, parts: list[tuple[PartShape, dict[str, torch.Tensor]]],
                   device: torch.device) -> None:
        """Fill `layer`'s tensors from its parts' checkpoint tensors, parts in row order.
        Floating tensors keep the dtype the format stores them in."""

    def quantize(self, layer: Linear, weight: torch.Tensor, name: str = "") -> None:
        """Fill `layer`'s tensors from a float weight [out_features, in_features] (dynamic
        quantization at load time: `--quantization`)."""
        part = PartShape(name, layer.out_features, layer.in_features)
        self.load_parts(layer, [(part, self.quantize_part(weight, part))], weight.device)

    @abstractmethod
    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The float32 weight [out_features, in_features] the layer's tensors stand for."""

    @abstractmethod
    def tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        """The layer's stored weight tensors by suffix (not the bias), as a checkpoint holds
        them for a single unfused part."""

    def stored_bytes(self, layer: Linear) -> int:
        """Bytes of the stored weight tensors (scales and zeros included; bias excluded)."""
        return sum(t.numel() * t.element_size() for t in self.tensors(layer).values())

    def attach_source(self, layer: Linear, parts: list[tuple[PartShape, dict[str, str]]],
                      source: Any, device: torch.device) -> None:
        """Formats that `reads_own_tensors`: take the layer's parts (row order), each with its
        checkpoint tensor names by suffix, and the source that reads them on demand."""
        raise NotImplementedError(f"the {self.name} format is loaded with load_parts")

    def held_tensors(self, layer: Linear) -> list[torch.Tensor]:
        """Weight tensors the format keeps outside the layer's parameters and buffers (counted
        by fitserve.models.weight_memory)."""
        return []

    def bits_per_weight(self, layer: Linear) -> float:
        return 8 * self.stored_bytes(layer) / (layer.out_features * layer.in_features)

    @abstractmethod
    def make_kernel(self, layer: Linear) -> LinearKernel:
        """The function the layer's forward calls, chosen once for the layer's device,
        backend and the CPU's kernels."""

    def reference_kernel(self, layer: Linear) -> LinearKernel:
        """Plain PyTorch: dequantize, then a float32 matmul rounded once to x's dtype. The
        definition every faster kernel of the format must match; it rebuilds the float weight
        on every call, so it is only the fallback where no kernel exists."""

        def apply(x: torch.Tensor) -> torch.Tensor:
            weight = self.dequantize(layer).to(x.device)
            bias = None if layer.bias is None else layer.bias.float()
            return torch.nn.functional.linear(x.float(), weight, bias).to(x.dtype)

        return apply

    def config_entry(self) -> dict:
        """What quantization_config records about this format (beyond per-layer data)."""
        return {"method": self.name}

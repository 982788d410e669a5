"""Choosing the multiply of an integer weight format: the CPU kernels' `QuantLinear`, the
Triton kernels on the GPU path, or the format's plain PyTorch reference.

An integer layer is described to the kernels as a list of *parts*, each a w8 or w4 block of
output rows with the rows of the layer's output it writes (None: all rows, in order), so w8,
w4 and MixLLM's mixed layers share one kernel object per layer, and the fused C++ decode stack
can take the same object (`Linear.cpu_kernel_object`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.weight_formats.base import LinearKernel
from fitserve.quant import packing

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear

logger = logging.getLogger("fitserve")
_logged: set[str] = set()


@dataclass(frozen=True)
class IntegerPart:
    """One block of an integer layer's output rows."""

    kind: str
    """"w8" (qweight, scales) or "w4" (qweight, scales, zeros)."""
    tensors: tuple[torch.Tensor, ...]
    out_rows: torch.Tensor | None
    """int64 output columns this block writes, None for all of them in order."""
    group_size: int = 0
    names: tuple[str, ...] = ()
    """The layer buffers `tensors` come from: where the CPU kernel holds a part in another
    layout (new tensors of the same size), the layer's buffers are replaced by them, so the
    weights are held once."""
    layout: str = "rows"
    """The layout `tensors` are in, "rows" (fitserve.quant.packing's) or "lanes"."""


W4_TENSOR_NAMES = ("qweight", "scales", "zeros")
W8_TENSOR_NAMES = ("qweight", "scales")


def w4_part(layer: Linear, out_rows: torch.Tensor | None, group_size: int) -> IntegerPart:
    """The layer's w4 tensors as a part, in the layout the layer holds them in."""
    return IntegerPart("w4", tuple(getattr(layer, name) for name in W4_TENSOR_NAMES), out_rows, group_size,
                       W4_TENSOR_NAMES, layer.held_layouts.get(W4_TENSOR_NAMES[0], "rows"))


def w8_part(layer: Linear, out_rows: torch.Tensor | None, names: tuple[str, str] = W8_TENSOR_NAMES) -> IntegerPart:
    """The layer's w8 tensors `names` (codes, scales) as a part, in the layout the layer holds them in."""
    return IntegerPart("w8", tuple(getattr(layer, name) for name in names), out_rows, 0, names,
                       layer.held_layouts.get(names[0], "rows"))


def w4_tensors_as_stored(layer: Linear, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's (qweight, scales, zeros) in fitserve.quant.packing's w4 layout, unpacked from
    the lanes layout where the CPU kernel repacked them (what dequantize and checkpoints read)."""
    tensors = tuple(getattr(layer, name) for name in W4_TENSOR_NAMES)
    if layer.held_layouts.get(W4_TENSOR_NAMES[0]) == "lanes":
        return packing.unpack_w4_lanes(*tensors, group_size)
    return tensors


def w8_tensors_as_stored(layer: Linear, names: tuple[str, str] = W8_TENSOR_NAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's w8 (codes, scales) `names` in fitserve.quant.packing's layout (see
    `w4_tensors_as_stored`)."""
    qweight, scales = (getattr(layer, name) for name in names)
    if layer.held_layouts.get(names[0]) == "lanes":
        return packing.unpack_w8_lanes(qweight), scales
    return qweight, scales


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.info(message)


def cpu_quant_linear(layer: Linear, parts: list[IntegerPart]) -> Any | None:
    """The compiled `QuantLinear` holding `parts` (None where the CPU kernels cannot be built:
    the reference runs instead, and a log line says so once)."""
    bias = None if layer.bias is None else layer.bias.detach()
    quant = cpu_kernels.quant_linear(layer.in_features, layer.out_features, bias)
    if quant is None:
        _log_once("integer weights: the CPU kernels are not available here; using the PyTorch reference (slow)")
        return None
    for part in parts:
        # A part of the layer's own buffers is repacked in place: the weights stay where the
        # loader put them (huge pages, fitserve.models.host_memory) and in memory once.
        in_place = bool(part.names)
        if part.kind == "w8":
            held = quant.add_w8(*part.tensors, part.out_rows, layout=part.layout, in_place=in_place)
        else:
            held = quant.add_w4(*part.tensors, part.group_size, part.out_rows, layout=part.layout, in_place=in_place)
        if part.names:
            layer.hold(part.names, held, quant.part_layouts()[-1])
    cpu_kernels.log_reference_parts(quant)
    return quant


def triton_linear(layer: Linear, parts: list[IntegerPart]) -> LinearKernel:
    """The Triton dequantizing matmuls (GPU path, or Triton's interpreter in tests)."""
    from fitserve.kernels import triton_quant

    # Each part adds the bias of the output rows it writes, in its own row order; the slices
    # are taken once here rather than gathered on every call.
    biases = [None if layer.bias is None else (layer.bias if part.out_rows is None else layer.bias[part.out_rows])
              for part in parts]

    def apply(x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x.shape[0], layer.out_features, dtype=x.dtype, device=x.device)
        for part, bias in zip(parts, biases, strict=True):
            if part.kind == "w8":
                triton_quant.w8_linear(x, *part.tensors, bias, out=out, out_rows=part.out_rows)
            else:
                triton_quant.w4_linear(x, *part.tensors, part.group_size, bias, out=out, out_rows=part.out_rows)
        return out

    return apply


def integer_kernel(layer: Linear, parts: list[IntegerPart], reference: LinearKernel) -> LinearKernel:
    """The fastest correct multiply for `layer` on its device: chosen once per layer."""
    device = parts[0].tensors[0].device
    if layer.use_triton:
        return triton_linear(layer, parts)
    if device.type == "cpu":
        quant = cpu_quant_linear(layer, parts)
        layer.cpu_kernel_object = quant
        if quant is not None:
            return lambda x: quant.forward(x.contiguous())
    else:
        _log_once(f"integer weights on {device.type} without the Triton path: using the PyTorch reference")
    return reference

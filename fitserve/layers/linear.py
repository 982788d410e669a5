"""A linear layer whose weight is stored in any weight format (see `weight_formats`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.weight_formats.base import LinearKernel, WeightFormat
from fitserve.layers.weight_formats.dense import DenseFormat


_CODES_BUFFER_OF = {"qweight": "qweight", "scales": "qweight", "zeros": "qweight",
                    "qweight_hp": "qweight_hp", "scales_hp": "qweight_hp"}
"""An integer part's buffers -> the name of its codes buffer (the key of `Linear.held_layouts`)."""


def into_slot(slots: dict[str, torch.Tensor], name: str, tensor: torch.Tensor) -> torch.Tensor | None:
    """`tensor` copied into the place `slots` set aside for `name` (the loader's huge-page arena;
    taken out, so a place is filled once), or None where there is none of its shape and dtype."""
    slot = slots.pop(name, None)
    if slot is None or slot.shape != tensor.shape or slot.dtype != tensor.dtype:
        return None
    return slot.copy_(tensor)


class Linear(nn.Module):
    """y = x @ W.T (+ bias), W stored as `weight_format` says (dense float by default).

    The dense format keeps nn.Linear's parameter names (`weight`, `bias`), so dense checkpoints
    and transformers' state dicts line up; other formats register their own tensors
    (`qweight`, `scales`, ...) when they are loaded. The function that multiplies is chosen
    once, the first time the layer runs after its tensors were set (`kernel`); anything that
    replaces the tensors calls `invalidate`. All projections of one model share `scratch` for
    their many-row matmuls.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool, scratch: cpu_kernels.MatmulScratch,
                 weight_format: WeightFormat | None = None, use_triton: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.scratch = scratch
        self.weight_format = weight_format or DenseFormat()
        self.use_triton = use_triton
        """The model runs the Triton path (GPU): quantized formats multiply with Triton kernels."""
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if self.weight_format.is_dense:
            self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self._kernel: LinearKernel | None = None
        self.cpu_kernel_object: Any = None
        """The compiled QuantLinear an integer layer's kernel calls on the CPU (set when the
        kernel is chosen), which the fused C++ decode stack calls too."""
        self.held_layouts: dict[str, str] = {}
        """Layout of an integer part's tensors, by the name of the part's codes buffer ("qweight",
        "qweight_hp"), where the CPU kernel holds them in another layout than the loaded one
        ("lanes" on AVX-512 VNNI: it repacks them, and the layer holds its tensors instead, so
        the weights stay in memory once); absent: as loaded (fitserve.quant.packing's). Readers
        of the codes go through weight_formats.quantized_kernels' *_tensors_as_stored."""
        self.tensor_slots: dict[str, torch.Tensor] = {}
        """Storage set aside for the format's tensors by name (the loader's huge-page arena,
        fitserve.models.host_memory): `set_tensor` copies a tensor of a slot's shape and dtype
        into it, once, instead of keeping the tensor it was given."""
        self.tensor_sharers: list[nn.Module] = []
        """Modules holding this layer's tensors too (the int8 embedding a w8 LM head is tied
        to): `hold` hands them the kernel's tensors as well (their `take_shared`)."""

    @property
    def is_dense(self) -> bool:
        return self.weight_format.is_dense

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        """Store one of the format's tensors (a buffer: saved in state_dict, no gradient)."""
        placed = into_slot(self.tensor_slots, name, tensor)
        self.register_buffer(name, tensor if placed is None else placed, persistent=True)
        if name in _CODES_BUFFER_OF:
            self.held_layouts.pop(_CODES_BUFFER_OF[name], None)
        self.invalidate()

    def hold(self, names: tuple[str, ...], tensors: list[torch.Tensor], layout: str) -> None:
        """Keep `tensors`, which the CPU kernel holds for one part (the same sizes, in `layout`),
        as the buffers `names` in place of the layer's own, without choosing the kernel again."""
        for name, tensor in zip(names, tensors, strict=True):
            previous = getattr(self, name)
            self.register_buffer(name, tensor, persistent=True)
            for sharer in self.tensor_sharers:
                sharer.take_shared(previous, tensor, layout)
        if layout == "rows":
            self.held_layouts.pop(names[0], None)
        else:
            self.held_layouts[names[0]] = layout

    def invalidate(self) -> None:
        """Choose the kernel again at the next call (after tensors were replaced)."""
        self._kernel = None
        self.cpu_kernel_object = None

    @property
    def kernel(self) -> LinearKernel:
        if self._kernel is None:
            self._kernel = self.weight_format.make_kernel(self)
        return self._kernel

    def compiled_cpu_kernel(self) -> Any:
        """The compiled QuantLinear of an integer layer on the CPU, or None (dense weights, or no
        compiled kernels): what the fused decode stack multiplies with."""
        _ = self.kernel  # choosing the kernel builds the object
        return self.cpu_kernel_object

    def stored_bytes(self) -> int:
        """Bytes of the weight as stored (scales and zeros included, bias excluded)."""
        return self.weight_format.stored_bytes(self)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight this layer multiplies by (the reference of every kernel)."""
        return self.weight_format.dequantize(self)

    def forward(self, x: torch.Tensor, result_in_scratch: bool = False) -> torch.Tensor:
        """x's projection. With `result_in_scratch` a dense float32 product of many rows may
        live in the shared scratch, valid only until the next projection (cpu_kernels.linear)."""
        if self.weight_format.is_dense:
            return cpu_kernels.linear(x, self.weight, self.bias, self.scratch, result_in_scratch)
        rows = x.numel() // x.shape[-1]
        out = self.kernel(x.reshape(rows, x.shape[-1]))
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, format={self.weight_format.name}")

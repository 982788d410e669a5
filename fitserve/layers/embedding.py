"""Token embeddings stored in int8 rows (the w8 format), for models whose LM head is tied to the
embedding: one int8 matrix then serves both, a quarter of float32's bytes in memory and in
every decode step's LM-head read."""

from __future__ import annotations

import torch
from torch import nn

from fitserve.kernels import cpu as cpu_kernels
from fitserve.quant import packing


class Int8Embedding(nn.Module):
    """Embedding lookup over `qweight` int8 [vocab, hidden] and `scales` float32 [vocab]:
    the gathered rows are dequantized (row * scale, rounded to `dtype`), so a lookup reads only
    the rows it returns."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.dtype = dtype
        self.layout = "rows"
        """Layout of `qweight`: "rows" as loaded, or "lanes" once the tied LM head's CPU kernel
        repacked the shared matrix (fitserve.quant.packing.pack_w8_lanes; see `take_shared`)."""

    def set_tensors(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        self.register_buffer("qweight", qweight.contiguous(), persistent=True)
        self.register_buffer("scales", scales.contiguous(), persistent=True)
        self.layout = "rows"

    def take_shared(self, previous: torch.Tensor, tensor: torch.Tensor, layout: str) -> None:
        """The LM head tied to this embedding now holds `tensor` (in `layout`) where it held
        `previous`: hold the same one, so the shared matrix stays in memory once."""
        if previous is self.qweight:
            self.register_buffer("qweight", tensor, persistent=True)
            self.layout = layout
        elif previous is self.scales:
            self.register_buffer("scales", tensor, persistent=True)

    def stored_codes(self) -> torch.Tensor:
        """`qweight` in fitserve.quant.packing's row layout, whatever layout it is held in."""
        return packing.unpack_w8_lanes(self.qweight) if self.layout == "lanes" else self.qweight

    def quantize(self, weight: torch.Tensor) -> None:
        """Fill from a float embedding matrix (round to nearest)."""
        self.set_tensors(*packing.quantize_w8(weight))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        kernels = cpu_kernels.get() if self.qweight.device.type == "cpu" else None
        if kernels is not None and self.dtype in (torch.float32, torch.bfloat16, torch.float16):
            # The same products and rounding in one pass over the rows' bytes: PyTorch builds
            # an index tensor per element of the rows (~0.27 ms of a w4 decode step on 2 cores).
            return kernels.int8_embedding_rows(self.qweight, self.scales, input_ids, self.layout == "lanes",
                                               self.dtype)
        return self.reference_rows(input_ids)

    def reference_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The lookup in PyTorch ops (other devices, or where the CPU kernels are not built)."""
        codes = packing.w8_lanes_rows(self.qweight, input_ids) if self.layout == "lanes" else self.qweight[input_ids]
        rows = codes.float() * self.scales[input_ids].unsqueeze(-1)
        return rows.to(self.dtype)

    def stored_bytes(self) -> int:
        return self.qweight.numel() + 4 * self.scales.numel()

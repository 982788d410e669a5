"""bitstack: elastic weights, a stack of ~1-bit residual blocks per checkpoint matrix of which
the first `depth` are loaded (layout: fitserve.quant.bitstack_packing).

Unlike the other formats, a layer's weight changes size while the model runs: a memory
budget decides how many blocks each matrix has (fitserve.models.elastic_weights), and a
resize appends or drops blocks between engine steps. So the format keeps, per part of a
(possibly fused) layer, a plain list of per-block tensors rather than one concatenated
stack: dropping a block frees its own allocations, and appending one never copies the
others. The loader does not read the stacks at all (`reads_own_tensors`): it hands the
format a `TensorSource` over the checkpoint's memory map, from which only the blocks in use
are read, one slice at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.weight_formats.base import LinearKernel, PartShape, TensorSpec, WeightFormat
from fitserve.layers.weight_formats.source import InMemorySource, TensorSource
from fitserve.quant import bitstack_packing
from fitserve.quant.bitstack import decompose
from fitserve.quant.bitstack_packing import SIGNS, TENSOR_SUFFIXES, U, V

if TYPE_CHECKING:
    from fitserve.layers.linear import Linear

Block = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One loaded block: (signs uint8 [N, ceil(K/8)], u float16 [N, r], v float16 [r, K])."""


_SIGN_TABLES: dict[torch.device, torch.Tensor] = {}


def _sign_table(device: torch.device) -> torch.Tensor:
    """float32 [256, 8]: row p holds the ±1 signs that packed byte p stands for."""
    table = _SIGN_TABLES.get(device)
    if table is None:
        bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
        table = _SIGN_TABLES[device] = (1.0 - 2.0 * bits.float()).to(device)
    return table


@dataclass
class StackPart:
    """One checkpoint matrix of a bitstack layer: where its blocks come from and which are loaded."""

    shape: PartShape
    rank: int
    num_blocks: int
    row_start: int
    """First output row of the fused layer that this part writes."""
    names: dict[str, str]
    """Tensor suffix (bitstack_signs, _u, _v) -> name in the block source."""
    source: TensorSource
    device: torch.device
    blocks: list[Block] = field(default_factory=list)
    """Loaded blocks 0..depth-1, each its own allocation."""

    @property
    def depth(self) -> int:
        return len(self.blocks)

    @property
    def block_bytes(self) -> int:
        return bitstack_packing.block_bytes(self.shape.rows, self.shape.in_features, self.rank)

    def read_block(self, index: int) -> Block:
        """Block `index` from the source (does not attach it)."""
        if not 0 <= index < self.num_blocks:
            raise IndexError(f"{self.shape.prefix} has blocks 0..{self.num_blocks - 1}, not {index}")
        signs, u, v = (self.source.read(self.names[suffix], index).to(self.device) for suffix in TENSOR_SUFFIXES)
        return signs, u, v

    def dequantize(self) -> torch.Tensor:
        """float32 [rows, in_features]: the sum of the loaded blocks (zeros with none).

        All blocks at once, with the signs unpacked through a 256-entry table (one gather
        per packed byte): equal to `bitstack_packing.dequantize_blocks` up to the order of
        the float32 sum, and ~8x faster on the bundled model's matrices than block by block."""
        rows, columns = self.shape.rows, self.shape.in_features
        if not self.blocks:
            return torch.zeros(rows, columns, device=self.device)
        signs, u, v = (torch.stack(tensors) for tensors in zip(*self.blocks, strict=True))
        unpacked = _sign_table(self.device)[signs.long()].reshape(len(self.blocks), rows, -1)[..., :columns]
        return (unpacked * torch.bmm(u.float(), v.float())).sum(0)


class BitStackFormat(WeightFormat):
    """Per-layer state: `parts`, one `StackPart` per fused checkpoint matrix, in row order.
    `ranks` maps each checkpoint matrix's prefix to its rank (quantization_config.ranks)."""

    name = "bitstack"
    reads_own_tensors = True

    def __init__(self, ranks: dict[str, int], num_blocks: int) -> None:
        self.ranks = ranks
        self.num_blocks = num_blocks
        self.parts: list[StackPart] = []

    def rank(self, part: PartShape) -> int:
        rank = self.ranks.get(part.prefix)
        if rank is None:
            raise ValueError(f"quantization_config.ranks has no rank for {part.prefix}")
        return rank

    def part_tensors(self, part: PartShape) -> dict[str, TensorSpec]:
        rank, n = self.rank(part), self.num_blocks
        return {SIGNS: TensorSpec((n, part.rows, bitstack_packing.packed_columns(part.in_features)), torch.uint8),
                U: TensorSpec((n, part.rows, rank), torch.float16),
                V: TensorSpec((n, rank, part.in_features), torch.float16)}

    def quantize_part(self, weight: torch.Tensor, part: PartShape) -> dict[str, torch.Tensor]:
        """Data-free decomposition (no activation scaling): `fitserve quantize` calibrates."""
        signs, u, v = decompose(weight, None, self.num_blocks, self.rank(part))
        return {SIGNS: signs, U: u, V: v}

    def attach_source(self, layer: Linear, parts: list[tuple[PartShape, dict[str, str]]],
                      source: TensorSource, device: torch.device) -> None:
        """Take the layer's parts (row order) with the source names of their tensors; no block
        is loaded yet (`set_blocks` does that)."""
        self.parts, row_start = [], 0
        for part, names in parts:
            self.parts.append(StackPart(part, self.rank(part), self.num_blocks, row_start, names, source,
                                        torch.device(device)))
            row_start += part.rows
        layer.invalidate()

    def load_parts(self, layer: Linear, parts: list[tuple[PartShape, dict[str, torch.Tensor]]],
                   device: torch.device) -> None:
        """Whole stacks in memory (not the loader's path): every block loaded."""
        tensors = {f"{part.prefix}.{suffix}": value for part, named in parts for suffix, value in named.items()}
        self.attach_source(layer, [(part, {suffix: f"{part.prefix}.{suffix}" for suffix in TENSOR_SUFFIXES})
                                   for part, _ in parts], InMemorySource(tensors), device)
        for part in self.parts:
            self.set_blocks(layer, part, [part.read_block(index) for index in range(part.num_blocks)])

    def set_blocks(self, layer: Linear, part: StackPart, blocks: list[Block]) -> None:
        """Make `blocks` the part's loaded blocks (a shorter list of the same tensors shrinks,
        a longer one grows); the layer picks its kernel again at its next call."""
        part.blocks = blocks
        layer.invalidate()

    def held_tensors(self, layer: Linear) -> list[torch.Tensor]:
        return [tensor for part in self.parts for block in part.blocks for tensor in block]

    def stored_bytes(self, layer: Linear) -> int:
        return sum(part.depth * part.block_bytes for part in self.parts)

    def dequantize(self, layer: Linear) -> torch.Tensor:
        return torch.cat([part.dequantize() for part in self.parts])

    def tensors(self, layer: Linear) -> dict[str, torch.Tensor]:
        """The loaded blocks stacked as a single-part checkpoint holds them (a copy: the
        format keeps one allocation per block)."""
        (part,) = self.parts
        return {suffix: torch.stack(tensors) for suffix, tensors in zip(TENSOR_SUFFIXES, zip(*part.blocks))}

    def make_kernel(self, layer: Linear) -> LinearKernel:
        """The compiled CPU `BitStackLinear` (fitserve.kernels.cpu.bitstack_linear: integer
        dot products straight from the packed signs for decode rows) where it is built, else
        the reference: dequantize the loaded blocks, then one float32 matmul. Made again after
        every resize (`set_blocks` invalidates the layer); it holds the blocks by reference,
        so building it copies nothing."""
        build = getattr(cpu_kernels, "bitstack_linear", None)
        on_cpu = all(part.device.type == "cpu" for part in self.parts)
        compiled = None
        if build is not None and on_cpu and not layer.use_triton:
            bias = None if layer.bias is None else layer.bias.detach().float()
            compiled = build(layer.in_features, layer.out_features, bias)
        if compiled is None:
            return self.reference_kernel(layer)
        for part in self.parts:
            index = compiled.add_part(part.shape.rows, part.rank)
            for signs, u, v in part.blocks:
                compiled.append_block(index, signs, u, v)
        return lambda x: compiled.forward(x.contiguous())

    def config_entry(self) -> dict:
        return {"method": self.name, "num_blocks": self.num_blocks}

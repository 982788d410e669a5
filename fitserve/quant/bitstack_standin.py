"""A dense fitserve model that multiplies by what a BitStack model stands for at given depths.

Measuring a block's worth (the global order) and a budget's perplexity only needs the weights
a partially loaded BitStack model multiplies by: Σ of each matrix's first d blocks. This
module keeps a dense float32 fitserve model and writes those partial sums into its projection
weights, so both are measured with fitserve's own forward pass, independent of the runtime
BitStack format (which computes the same products without rebuilding the weights).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fitserve.models.llama import LlamaForCausalLM
from fitserve.models.loader import linear_layouts
from fitserve.quant import bitstack_packing
from fitserve.quant.evaluate import window_nll


@dataclass
class Stack:
    """One checkpoint matrix's stacked blocks (bitstack_packing's layout)."""

    signs: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor

    @property
    def num_blocks(self) -> int:
        return self.signs.shape[0]

    @property
    def in_features(self) -> int:
        return self.v.shape[2]

    @property
    def rank(self) -> int:
        return self.u.shape[2]

    def block_bytes(self) -> int:
        return bitstack_packing.block_bytes(self.signs.shape[1], self.in_features, self.rank)

    def block(self, index: int) -> torch.Tensor:
        """The float32 matrix block `index` stands for."""
        return bitstack_packing.block_weight(self.signs[index], self.u[index], self.v[index], self.in_features)

    def weight(self, depth: int) -> torch.Tensor:
        """Σ of the first `depth` blocks (float32)."""
        return bitstack_packing.dequantize_blocks(self.signs[:depth], self.u[:depth], self.v[:depth],
                                                  self.in_features)


class StandIn:
    """A dense float32 fitserve model whose projections hold each matrix's first d blocks.

    `model` must be a dense float32 LlamaForCausalLM of the same architecture (its embedding,
    norms and LM head are used as they are); `set_depths` writes partial sums into the
    projections' weights, rebuilding only the matrices whose depth changed.
    """

    def __init__(self, model: LlamaForCausalLM, stacks: dict[str, Stack]) -> None:
        self.model = model
        self.stacks = stacks
        self.depths: dict[str, int] = {}
        self._rows: dict[str, tuple[torch.Tensor, int, int]] = {}
        for layout in linear_layouts(model.config):
            weight = model.get_submodule(layout.module_name).weight
            start = 0
            for part in layout.parts:
                if part.prefix in stacks:
                    self._rows[part.prefix] = (weight, start, part.rows)
                start += part.rows
        missing = set(stacks) - set(self._rows)
        if missing:
            raise ValueError(f"the model has no projection named {sorted(missing)[0]}")

    @torch.inference_mode()
    def set_depths(self, depths: dict[str, int]) -> None:
        """Load the first depths[prefix] blocks of each named matrix (others keep theirs)."""
        for prefix, depth in depths.items():
            if self.depths.get(prefix) == depth:
                continue
            weight, start, rows = self._rows[prefix]
            weight[start:start + rows].copy_(self.stacks[prefix].weight(depth))
            self.depths[prefix] = depth

    @contextmanager
    def without_last_block(self, prefix: str):
        """Within the block, `prefix` has its last loaded block removed; the exact weights are
        restored afterwards (cheaper than set_depths when a measurement moves one matrix by one
        block and back)."""
        weight, start, rows = self._rows[prefix]
        saved = weight[start:start + rows].clone()
        depth = self.depths[prefix]
        with torch.inference_mode():
            weight[start:start + rows].sub_(self.stacks[prefix].block(depth - 1))
        self.depths[prefix] = depth - 1
        try:
            yield
        finally:
            with torch.inference_mode():
                weight[start:start + rows].copy_(saved)
            self.depths[prefix] = depth

    def loss(self, windows: list[list[int]]) -> float:
        """Mean negative log-likelihood per scored token (the card's protocol)."""
        total = sum(window_nll(self.model, window) for window in windows)
        return total / sum(len(window) - 1 for window in windows)


def read_stacks(model_dir: Path, prefixes: list[str]) -> dict[str, Stack]:
    """Every named matrix's full stack from a BitStack model directory."""
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as file:
        return {prefix: Stack(*(file.get_tensor(f"{prefix}.{suffix}") for suffix in bitstack_packing.TENSOR_SUFFIXES))
                for prefix in prefixes}

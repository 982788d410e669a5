"""A memory budget for a BitStack model: which blocks are loaded, and moving between budgets.

Every checkpoint matrix always has its block 0 (the smallest loadable model); the other
blocks load in quantization_config's `block_order`, the most valuable first. A budget of B
bytes (all weights: embedding, LM head, norms, biases and loaded blocks, as
`weight_memory_bytes` counts them) loads the longest prefix of that order that fits, so
the loaded set is always a prefix: a larger budget never loses a block a smaller one has,
and shrinking then growing back to the same budget restores exactly the same weights.

A change of budget has two halves so that an engine can keep stepping in between:
`read_blocks` (the slow part, disk reads; safe in a background thread, it only reads) and
`apply` (between steps: drops blocks, attaches the ones read, frees memory back to the
operating system).
"""

from __future__ import annotations

import bisect
from collections import Counter
import ctypes
import ctypes.util
import logging
import threading
from dataclasses import asdict, dataclass

import torch

from fitserve.config import ConfigError
from fitserve.layers.linear import Linear
from fitserve.layers.weight_formats.bitstack import BitStackFormat, Block, StackPart
from fitserve.models.weight_memory import weight_memory_bytes
from fitserve.quant import bitstack_budget

logger = logging.getLogger("fitserve")

MIB = 2**20


class WeightBudgetError(ConfigError):
    """A weight-memory budget outside what the model can load; the message gives the range."""


@dataclass(frozen=True)
class WeightMemoryInfo:
    """Where a BitStack model stands: bytes loaded, the range a budget may take, blocks."""

    current_bytes: int
    """Bytes of all weights now in memory."""
    budget_bytes: int
    """The budget the loaded blocks were chosen for (the full model's size when none was set)."""
    min_bytes: int
    """The smallest loadable model: everything but the blocks, plus block 0 of every matrix."""
    max_bytes: int
    """Every block of every matrix loaded."""
    blocks_loaded: int
    blocks_total: int
    pending_budget_bytes: int | None = None
    """A resize in progress (blocks still being read), or None."""

    def to_dict(self) -> dict:
        return asdict(self)


def _mib(size: int) -> str:
    return f"{size / MIB:.2f} MiB"


def release_free_memory() -> None:
    """Ask glibc to hand freed heap pages back to the OS (freed blocks are many mid-sized
    allocations, which glibc otherwise keeps for reuse, so resident memory would not fall)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def release_blocks(dropped: list[Block]) -> None:
    """Free detached blocks (the list held their last references) and return the memory."""
    if dropped:
        dropped.clear()
        release_free_memory()


class ElasticWeights:
    """The BitStack layers of one model and the global block order they load in."""

    def __init__(self, model: torch.nn.Module, block_order: list[str]) -> None:
        """`model`'s BitStack layers must have their sources attached and no block loaded."""
        parts: dict[str, tuple[Linear, StackPart]] = {}
        for module in model.modules():
            if isinstance(module, Linear) and isinstance(module.weight_format, BitStackFormat):
                for part in module.weight_format.parts:
                    parts[part.shape.prefix] = (module, part)
        if not parts:
            raise ValueError("the model has no BitStack layers")
        self._parts = parts
        """Each checkpoint matrix's layer and stack part, by its prefix."""
        self.fixed_bytes = weight_memory_bytes(model) - self.blocks_bytes()
        """Bytes of everything but the blocks (embedding, LM head, norms, biases)."""
        unknown = next((prefix for prefix in block_order if prefix not in parts), None)
        if unknown is not None:
            raise ValueError(f"quantization_config.block_order names {unknown!r}, which is not a matrix of "
                             "this model")
        self._order_prefixes = list(block_order)
        later_blocks = Counter(block_order)
        self._block_sizes = {prefix: part.block_bytes for prefix, (_, part) in parts.items()}
        self.min_bytes, self.max_bytes = bitstack_budget.budget_range(
            self.fixed_bytes, self._block_sizes, {prefix: 1 + later_blocks[prefix] for prefix in parts})
        self.blocks_total = len(parts) + len(block_order)
        self.budget_bytes = self.max_bytes
        self.loaded_count = -1
        """Entries of the order loaded (-1 until the first `apply`)."""

    # ------------------------------------------------------------------ budgets

    def blocks_bytes(self) -> int:
        return sum(part.depth * part.block_bytes for _, part in self._parts.values())

    @property
    def current_bytes(self) -> int:
        return self.fixed_bytes + self.blocks_bytes()

    @property
    def blocks_loaded(self) -> int:
        return sum(part.depth for _, part in self._parts.values())

    def check_budget(self, budget: int) -> int:
        """How many entries of the order `budget` loads; WeightBudgetError outside the range."""
        if isinstance(budget, bool) or not isinstance(budget, int):
            raise WeightBudgetError(f"weight memory must be a number of bytes (got {budget!r})")
        try:
            return bitstack_budget.loaded_blocks(self._order_prefixes, self._block_sizes, self.fixed_bytes, budget)
        except bitstack_budget.BudgetError as error:
            raise WeightBudgetError(str(error)) from None

    def _depths(self, count: int) -> dict[str, int]:
        """Each matrix's depth with the first `count` entries of the order loaded."""
        return bitstack_budget.depths_for(self._order_prefixes, count, list(self._parts))

    # ------------------------------------------------------------------ moving

    def read_blocks(self, count: int, cancel: threading.Event | None = None) -> dict[tuple[str, int], Block] | None:
        """The blocks `apply(count, ...)` needs that are not loaded, by (matrix prefix, block
        index), read from the checkpoint (None if `cancel` was set meanwhile). Only reads: safe
        beside running steps."""
        depths = self._depths(count)
        blocks: dict[tuple[str, int], Block] = {}
        try:
            for prefix, (_, part) in self._parts.items():
                for index in range(part.depth, depths[prefix]):
                    if cancel is not None and cancel.is_set():
                        return None
                    blocks[(prefix, index)] = part.read_block(index)
        finally:
            self._close_sources()
        return blocks

    def _close_sources(self) -> None:
        for source in {id(part.source): part.source for _, part in self._parts.values()}.values():
            source.close()

    def apply(self, count: int, blocks: dict[tuple[str, int], Block] | None = None) -> list[Block]:
        """Load exactly the first `count` entries of the order (and every block 0): detach the
        blocks past it, attach `blocks` (from `read_blocks`; any missing are read now). Call
        between steps: the layers' kernels change. Returns the detached blocks, the last
        references to them: `release_blocks` frees them (freeing ~1 GB takes ~0.1 s, which an
        engine does off its stepping thread)."""
        depths = self._depths(count)
        blocks = blocks or {}
        dropped: list[Block] = []
        for prefix, (layer, part) in self._parts.items():
            target = depths[prefix]
            if target < part.depth:
                dropped.extend(part.blocks[target:])
                layer.weight_format.set_blocks(layer, part, part.blocks[:target])
            elif target > part.depth:
                added = [blocks.get((prefix, index)) or part.read_block(index) for index in range(part.depth, target)]
                layer.weight_format.set_blocks(layer, part, part.blocks + added)
        self._close_sources()
        self.loaded_count = count
        return dropped

    def set_budget(self, budget: int) -> None:
        """Load what `budget` allows, now (at load time, or from a caller that steps no engine)."""
        count = self.check_budget(budget)
        release_blocks(self.apply(count))
        self.budget_bytes = budget

    def info(self, pending_budget: int | None = None) -> WeightMemoryInfo:
        return WeightMemoryInfo(self.current_bytes, self.budget_bytes, self.min_bytes, self.max_bytes,
                                self.blocks_loaded, self.blocks_total, pending_budget)

    def summary(self, curve: list[tuple[float, float]]) -> str:
        """For the banner: loaded size within the range, blocks, and the expected held-out
        perplexity interpolated from quantization_config's curve when it covers the size."""
        text = (f"{_mib(self.current_bytes)} loaded (range {_mib(self.min_bytes)} to {_mib(self.max_bytes)}), "
                f"{self.blocks_loaded}/{self.blocks_total} blocks")
        expected = interpolate(curve, self.current_bytes)
        if expected is not None:
            text += f", expected held-out perplexity {expected:.2f}"
        return text


def interpolate(curve: list[tuple[float, float]], size: float) -> float | None:
    """Linear interpolation of (size, value) points sorted by size; None outside them."""
    if not curve or not curve[0][0] <= size <= curve[-1][0]:
        return None
    index = bisect.bisect_left([point[0] for point in curve], size)
    if curve[index][0] == size:
        return curve[index][1]
    (x0, y0), (x1, y1) = curve[index - 1], curve[index]
    return y0 + (y1 - y0) * (size - x0) / (x1 - x0)

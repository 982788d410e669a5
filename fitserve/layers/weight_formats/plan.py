"""Which weight format each layer of a model gets: dense, or one of the integer formats,
read from a quantized checkpoint's `quantization_config` or asked for with `--quantization`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fitserve.layers.weight_formats.base import WeightFormat
from fitserve.layers.weight_formats.bitstack import BitStackFormat
from fitserve.layers.weight_formats.dense import DenseFormat
from fitserve.layers.weight_formats.mixllm import MixedFormat
from fitserve.layers.weight_formats.w4 import DEFAULT_GROUP_SIZE, W4Format
from fitserve.layers.weight_formats.w8 import W8Format
from fitserve.quant.methods import DYNAMIC_METHODS, HEAD_FORMATS, QUANTIZATION_METHODS

__all__ = ["DYNAMIC_METHODS", "QUANTIZATION_METHODS", "FormatPlan", "FormatPlanError"]

QUANT_METHOD_TAG = "fitserve"
"""`quant_method` in config.json, so other tools see the format is fitserve's own."""


class FormatPlanError(ValueError):
    """A quantization setting or quantization_config that cannot be used; says what to fix."""


@dataclass
class FormatPlan:
    """The weight format of every linear layer and of the embedding."""

    method: str = "dense"
    """dense, w8, w4, mixllm or bitstack."""
    group_size: int = DEFAULT_GROUP_SIZE
    """Input columns per scale/zero of the 4-bit formats."""
    lm_head: str = "w8"
    """w8 or dense: the LM head's format (the embedding's too when they are tied)."""
    high_channels: dict[str, list[int]] = field(default_factory=dict)
    """mixllm: high-precision output rows of each checkpoint matrix, by its name prefix."""
    num_blocks: int = 0
    """bitstack: residual blocks stored per checkpoint matrix (the same for all)."""
    ranks: dict[str, int] = field(default_factory=dict)
    """bitstack: rank of every block of each checkpoint matrix, by its name prefix."""
    block_order: list[str] = field(default_factory=list)
    """bitstack: the load order of every block after each matrix's first; the i-th occurrence
    of a prefix is that matrix's block i. A memory budget loads a prefix of this list."""
    perplexity_curve: list[tuple[float, float]] = field(default_factory=list)
    """bitstack: (weight bytes, held-out perplexity) measured when the model was made, for
    the banner's expected perplexity at the loaded size (empty: not measured)."""
    prequantized: bool = False
    """The checkpoint holds the quantized tensors (else they are made from dense ones at load)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other quantization_config entries (summary, calibration), written back unchanged."""

    def __post_init__(self) -> None:
        if self.method not in ("dense", *QUANTIZATION_METHODS):
            raise FormatPlanError(f"unknown quantization method {self.method!r}; use one of "
                                  f"{', '.join(QUANTIZATION_METHODS)}")
        if self.lm_head not in HEAD_FORMATS:
            raise FormatPlanError(f"unknown LM-head format {self.lm_head!r}; use w8 or dense")
        if self.group_size < 2 or self.group_size % 2:
            raise FormatPlanError(f"group size must be an even number >= 2 (got {self.group_size})")
        if self.method in ("mixllm", "bitstack") and not self.prequantized:
            raise FormatPlanError(f"{self.method} needs calibration: make the model with "
                                  f"`fitserve quantize MODEL --method {self.method} --out DIR`, then load DIR")
        if self.method == "bitstack":
            self._check_bitstack()

    def _check_bitstack(self) -> None:
        """The bitstack entries are well formed (whether they match the model's matrices is
        checked when the model is loaded)."""
        if isinstance(self.num_blocks, bool) or not isinstance(self.num_blocks, int) or self.num_blocks < 1:
            raise FormatPlanError(f"quantization_config.num_blocks must be an integer >= 1 (got {self.num_blocks!r})")
        if not isinstance(self.ranks, dict) or not all(
                isinstance(rank, int) and not isinstance(rank, bool) and rank >= 1 for rank in self.ranks.values()):
            raise FormatPlanError("quantization_config.ranks must map matrix names to integer ranks >= 1")
        if not isinstance(self.block_order, list) or not all(isinstance(name, str) for name in self.block_order):
            raise FormatPlanError("quantization_config.block_order must be a list of matrix names")
        unknown = sorted(set(self.block_order) - set(self.ranks))
        if unknown:
            raise FormatPlanError(f"quantization_config.block_order names {unknown[0]!r}, which has no rank in "
                                  "quantization_config.ranks")
        counts: dict[str, int] = {}
        for name in self.block_order:
            counts[name] = counts.get(name, 0) + 1
        too_many = [name for name, count in counts.items() if count > self.num_blocks - 1]
        if too_many:
            raise FormatPlanError(f"quantization_config.block_order lists {too_many[0]!r} "
                                  f"{counts[too_many[0]]} times, more than its {self.num_blocks - 1} blocks after "
                                  "the first")
        try:
            self.perplexity_curve = sorted((float(size), float(ppl)) for size, ppl in self.perplexity_curve)
        except (TypeError, ValueError) as error:
            raise FormatPlanError("quantization_config.perplexity_curve must be a list of "
                                  "[weight_bytes, perplexity] pairs") from error

    @property
    def is_dense(self) -> bool:
        return self.method == "dense"

    def linear_format(self) -> WeightFormat:
        """The format of a decoder layer's projection."""
        if self.method == "w8":
            return W8Format()
        if self.method == "w4":
            return W4Format(self.group_size)
        if self.method == "mixllm":
            return MixedFormat(self.high_channels, self.group_size)
        if self.method == "bitstack":
            return BitStackFormat(self.ranks, self.num_blocks)
        return DenseFormat()

    def head_format(self) -> WeightFormat:
        """The LM head's format (and the embedding's, when tied)."""
        if self.is_dense or self.lm_head == "dense":
            return DenseFormat()
        return W8Format()

    def to_config(self) -> dict[str, Any]:
        """quantization_config as written to config.json."""
        entry = {"quant_method": QUANT_METHOD_TAG, **self.linear_format().config_entry(), "lm_head": self.lm_head}
        if self.method == "mixllm":
            entry["high_precision_channels"] = self.high_channels
        if self.method == "bitstack":
            entry.update(num_blocks=self.num_blocks, ranks=self.ranks, block_order=self.block_order)
            if self.perplexity_curve:
                entry["perplexity_curve"] = [list(point) for point in self.perplexity_curve]
        return {**entry, **self.extra}

    @classmethod
    def from_config(cls, raw: dict[str, Any]) -> FormatPlan:
        """Parse config.json's quantization_config (FormatPlanError names what is wrong)."""
        if not isinstance(raw, dict) or raw.get("quant_method") != QUANT_METHOD_TAG:
            method = raw.get("quant_method") if isinstance(raw, dict) else raw
            raise FormatPlanError(f"quantization_config with quant_method {method!r} is not supported; "
                                  f"fitserve loads checkpoints made by `fitserve quantize` "
                                  f"(quant_method {QUANT_METHOD_TAG!r}) or dense ones")
        known = {"quant_method", "method", "bits", "high_precision_bits", "group_size", "lm_head",
                 "high_precision_channels", "num_blocks", "ranks", "block_order", "perplexity_curve"}
        high = raw.get("high_precision_channels", {})
        if not isinstance(high, dict) or not all(
                isinstance(rows, list) and all(isinstance(row, int) for row in rows) for rows in high.values()):
            raise FormatPlanError("quantization_config.high_precision_channels must map matrix names to "
                                  "lists of row indices")
        plan = cls(method=str(raw.get("method")), group_size=int(raw.get("group_size", DEFAULT_GROUP_SIZE)),
                   lm_head=str(raw.get("lm_head", "w8")), high_channels=high, prequantized=True,
                   num_blocks=raw.get("num_blocks", 0), ranks=raw.get("ranks", {}),
                   block_order=raw.get("block_order", []), perplexity_curve=raw.get("perplexity_curve", []),
                   extra={key: value for key, value in raw.items() if key not in known})
        # The method decides the layout; bit widths that say otherwise mean the config does not
        # describe these tensors (edited, or written by another tool), and loading would run
        # weights as something they are not.
        written = plan.linear_format().config_entry()
        for key in ("bits", "high_precision_bits"):
            if key in raw and key in written and raw[key] != written[key]:
                raise FormatPlanError(f"quantization_config.{key} is {raw[key]!r}, but method {plan.method!r} "
                                      f"stores {written[key]}-bit weights there; the config does not describe this "
                                      f"checkpoint (quantize the dense model again with `fitserve quantize`)")
        return plan

"""Which weight format each layer of a model gets: dense, or one of the integer formats,
read from a quantized checkpoint's `quantization_config` or asked for with `--quantization`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fitserve.layers.weight_formats.base import WeightFormat
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
    """dense, w8, w4 or mixllm."""
    group_size: int = DEFAULT_GROUP_SIZE
    """Input columns per scale/zero of the 4-bit formats."""
    lm_head: str = "w8"
    """w8 or dense: the LM head's format (the embedding's too when they are tied)."""
    high_channels: dict[str, list[int]] = field(default_factory=dict)
    """mixllm: high-precision output rows of each checkpoint matrix, by its name prefix."""
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
        if self.method == "mixllm" and not self.prequantized:
            raise FormatPlanError("mixllm needs calibration: make the model with "
                                  "`fitserve quantize MODEL --method mixllm --out DIR`, then load DIR")

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
                 "high_precision_channels"}
        high = raw.get("high_precision_channels", {})
        if not isinstance(high, dict) or not all(
                isinstance(rows, list) and all(isinstance(row, int) for row in rows) for rows in high.values()):
            raise FormatPlanError("quantization_config.high_precision_channels must map matrix names to "
                                  "lists of row indices")
        return cls(method=str(raw.get("method")), group_size=int(raw.get("group_size", DEFAULT_GROUP_SIZE)),
                   lm_head=str(raw.get("lm_head", "w8")), high_channels=high, prequantized=True,
                   extra={key: value for key, value in raw.items() if key not in known})

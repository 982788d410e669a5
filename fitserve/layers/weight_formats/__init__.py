"""Weight formats: dense float, w8, w4 and MixLLM's mixed w4/w8 (see base.py for the seam)."""

from fitserve.layers.weight_formats.base import LinearKernel, PartShape, TensorSpec, WeightFormat
from fitserve.layers.weight_formats.dense import DenseFormat
from fitserve.layers.weight_formats.mixllm import MixedFormat
from fitserve.layers.weight_formats.plan import (
    DYNAMIC_METHODS, QUANTIZATION_METHODS, FormatPlan, FormatPlanError,
)
from fitserve.layers.weight_formats.w4 import W4Format
from fitserve.layers.weight_formats.w8 import W8Format

__all__ = [
    "DYNAMIC_METHODS", "QUANTIZATION_METHODS", "DenseFormat", "FormatPlan", "FormatPlanError", "LinearKernel",
    "MixedFormat", "PartShape", "TensorSpec", "W4Format", "W8Format", "WeightFormat",
]

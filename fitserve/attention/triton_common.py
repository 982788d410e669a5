"""Host-side helpers shared by the Triton attention kernels' launchers.

Kept apart from the kernels so that the decode and prefill modules, and the public
`triton_paged` module that dispatches between them, can all use them without importing
each other.
"""

from __future__ import annotations

import math
import os

import torch

LOG2E = 1.4426950408889634
"""The kernels use exp2 (one hardware instruction) instead of exp, so scores are pre-scaled by
log2(e); the softmax is unchanged because exp(x) == exp2(x * log2(e))."""

MIN_DOT_SIZE = 16
"""`tl.dot` needs every operand dimension to be at least 16 on NVIDIA GPUs."""


def is_interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET=1`).

    The interpreter stores bfloat16 as raw 16-bit integers and only converts them correctly;
    arithmetic on them (including `tl.dot`) gives garbage. The kernels therefore take an
    `UPCAST_OPERANDS` flag that converts loaded values to float32 before any arithmetic.
    Products of two 16-bit floats are exact in float32, so this reproduces the GPU's
    tensor-core numerics (16-bit inputs, float32 accumulation) rather than approximating them.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(tensor: torch.Tensor) -> None:
    """Fail with an actionable message instead of Triton's when no GPU can run the kernels."""
    if not tensor.is_cuda and not is_interpreting():
        raise RuntimeError(
            "The Triton attention backend needs CUDA tensors (got a tensor on "
            f"{tensor.device}); use the 'torch' attention backend on CPU, or set "
            "TRITON_INTERPRET=1 before importing triton to run the kernels in its (slow) "
            "CPU interpreter for testing."
        )


def dot_input_precision(dtype: torch.dtype) -> str:
    """`tl.dot` input precision for operands of `dtype`.

    Triton's default for float32 operands is TF32 (10-bit mantissa), which would make the
    float32 path disagree with the torch reference; float32 asks for exact IEEE products.
    For 16-bit operands the setting is ignored and tensor cores are used.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def padded_head_dim(head_dim: int) -> int:
    """The power-of-two tile width that holds one head (masked past `head_dim`)."""
    return max(MIN_DOT_SIZE, next_power_of_2(head_dim))


def next_power_of_2(value: int) -> int:
    """Smallest power of two >= value (1 for value <= 1); tile shapes must be powers of two."""
    return 1 if value <= 1 else 2 ** math.ceil(math.log2(value))


def cdiv(numerator: int, denominator: int) -> int:
    """Ceiling division for grid sizes."""
    return -(-numerator // denominator)

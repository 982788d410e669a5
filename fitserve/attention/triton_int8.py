"""Triton pieces of the int8 KV cache (fitserve.attention.cache_layout defines the format).

The quantizing store computes exactly `quantize_int8`'s float32 operations, so the GPU path
and the torch path write the same bytes: IEEE divisions (`div_rn`; Triton's plain `/` is an
approximate division on GPUs) and round-half-to-even by the float32 magic number 1.5 * 2**23
(adding it leaves no fraction bits, so the hardware's round-to-nearest-even does the
rounding; the kernels that call this are compiled with `enable_fp_fusion=False`, so the
product is rounded before the addition as torch rounds it).
"""

from __future__ import annotations

import triton
import triton.language as tl

ROUNDING_MAGIC = 12582912.0  # 1.5 * 2**23


@triton.jit
def int8_inverse_and_scale(amax):
    """(127 / amax, amax / 127) per row of `amax` (float32), 0 and 0 where amax is 0."""
    safe = tl.where(amax > 0, amax, 1.0)
    int8_max = tl.zeros_like(amax) + 127.0
    inverse = tl.where(amax > 0, tl.math.div_rn(int8_max, safe), 0.0)
    return inverse, tl.math.div_rn(amax, int8_max)


@triton.jit
def int8_values(x, inverse):
    """round_half_even(x * inverse[:, None]) clamped to [-127, 127], as int8 (x float32 [rows, dims])."""
    y = x * inverse[:, None]
    y = (y + 12582912.0) - 12582912.0
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    return y.to(tl.int8)

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


@triton.jit
def int8_operand(values, dtype: tl.constexpr, UPCAST_OPERANDS: tl.constexpr):
    """A loaded int8 tile as a dot operand of `dtype` (exact: |v| <= 127); float32 in Triton's
    interpreter, which converts int8 to bfloat16 wrongly (its operands are float32 anyway)."""
    if UPCAST_OPERANDS:
        converted = values.to(tl.float32)
    else:
        converted = values.to(dtype)
    return converted


@triton.jit
def load_token_scales(key_scales_ptr, value_scales_ptr, block_numbers, positions, position_valid, kv_head,
                      stride_scale_block, stride_scale_token, BLOCK_SIZE: tl.constexpr):
    """The key and value scales of a tile of cached tokens of one KV head (0 where invalid)."""
    offsets = block_numbers * stride_scale_block + (positions % BLOCK_SIZE) * stride_scale_token + kv_head
    key_scales = tl.load(key_scales_ptr + offsets, mask=position_valid, other=0.0)
    value_scales = tl.load(value_scales_ptr + offsets, mask=position_valid, other=0.0)
    return key_scales, value_scales


@triton.jit
def store_int8_halves(cache_ptr, scales_ptr, first_offsets, half, first, second, scale_offsets, mask, scale_mask):
    """Quantize heads given as two halves (float32 [heads, half]) and store them at
    cache_ptr + first_offsets (+ half), their scales at scales_ptr + scale_offsets."""
    inverse, scale = int8_inverse_and_scale(tl.maximum(tl.max(tl.abs(first), axis=1), tl.max(tl.abs(second), axis=1)))
    tl.store(cache_ptr + first_offsets, int8_values(first, inverse), mask=mask)
    tl.store(cache_ptr + first_offsets + half, int8_values(second, inverse), mask=mask)
    tl.store(scales_ptr + scale_offsets, scale, mask=scale_mask)

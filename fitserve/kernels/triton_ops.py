"""The small per-layer ops of the GPU path as Triton kernels: RMSNorm (+ residual add),
rotary embedding with the KV-cache write, and SiLU·up.

Why: a decode step is memory-bound on the weights, and everything else should cost next to
nothing. In plain torch, one layer's norms, rotary and activation are ~30 small kernels
(RMSNorm alone is seven: cast, square, mean, add, rsqrt, multiply, cast, weight multiply);
each costs a few microseconds of launch and tail even inside a CUDA graph, which for
Llama-3-8B adds up to milliseconds per step next to a weight read of a few milliseconds.
Fused, a layer runs four of them (Qwen3's per-head q/k norms add two).

The rounding is the torch code's (`fitserve.models.llama`, which follows transformers):
every intermediate that code stores in the model dtype is rounded to it here too, and the
kernels that combine products launch without FMA contraction, so the Triton and torch paths
differ only where a reduction's order differs (the RMSNorm's sum of squares). The kernels
convert everything they load to float32 before any arithmetic, which is also what Triton's
CPU interpreter needs for bfloat16 (see `fitserve.attention.triton_common.is_interpreting`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.attention.triton_common import check_device, next_power_of_2
from fitserve.attention.triton_int8 import store_int8_halves

SILU_BLOCK = 1024
"""Elements of one row of the MLP's intermediate activation per SiLU·up program."""


def _num_warps(elements: int) -> int:
    """Warps for a program holding `elements` values: 4 up to 1024, more for wide rows so no
    thread holds more than ~32 of them (Llama-3-8B's 4096-wide rows take 8)."""
    return max(4, min(16, elements // 512))


@triton.jit
def _round(x, dtype: tl.constexpr):
    """float32 `x` rounded to `dtype` (to nearest, ties to even), still as float32.

    Written out for bfloat16 because Triton's CPU interpreter truncates on conversion where a
    GPU rounds; a value that `dtype` represents exactly converts the same everywhere.
    """
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    elif dtype == tl.float16:
        return x.to(tl.float16).to(tl.float32)
    else:
        return x


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x_row,
    stride_x_head,
    stride_residual_row,
    stride_out_row,
    stride_out_head,
    hidden,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x_row + head * stride_x_head + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        # residual + x rounded to the dtype first, as `+` does, and kept as the new residual.
        residual_row = residual_ptr + row * stride_residual_row + cols
        x = _round(x + tl.load(residual_row, mask=mask, other=0.0).to(tl.float32), dtype)
        tl.store(residual_row, x.to(dtype), mask=mask)
    inverse = 1.0 / tl.sqrt_rn(tl.sum(x * x, axis=0) / hidden + eps)
    # Cast back to the dtype before the weight multiply, as transformers does.
    normed = _round(x * inverse, dtype)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(
        out_ptr + row * stride_out_row + head * stride_out_head + cols,
        _round(weight * normed, dtype).to(dtype),
        mask=mask,
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * to_dtype(x * rsqrt(mean(x²) + eps)) over the last dimension, into a new
    contiguous tensor. `x` is [rows, hidden] or [tokens, heads, head_dim] (the per-head q/k
    norm of Qwen3, whose input is a strided view of the fused QKV output); only its last
    dimension must be contiguous."""
    check_device(x)
    if x.stride(-1) != 1:
        x = x.contiguous()
    as_heads = x if x.dim() == 3 else x.unsqueeze(1) if x.dim() == 2 else x.reshape(-1, 1, x.shape[-1])
    rows, heads, hidden = as_heads.shape
    out = torch.empty((rows, heads, hidden), dtype=x.dtype, device=x.device)
    if rows:
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(rows, heads)](
            as_heads, out, weight, out,
            as_heads.stride(0), as_heads.stride(1), 0, out.stride(0), out.stride(1),
            hidden, eps,
            HAS_RESIDUAL=False, BLOCK=block, num_warps=_num_warps(block),
        )
    return out.view(x.shape)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) for [rows, hidden] inputs in one pass. The sum
    is written into `residual` (which must be contiguous), so callers must not reuse it."""
    check_device(x)
    assert residual.is_contiguous() and residual.shape == x.shape and residual.dtype == x.dtype
    if x.stride(-1) != 1:
        x = x.contiguous()
    rows, hidden = x.shape
    out = torch.empty_like(residual)
    if rows:
        block = next_power_of_2(hidden)
        _rms_norm_kernel[(rows, 1)](
            x, residual, weight, out,
            x.stride(0), 0, residual.stride(0), out.stride(0), 0,
            hidden, eps,
            HAS_RESIDUAL=True, BLOCK=block, num_warps=_num_warps(block),
        )
    return out, residual


@triton.jit
def _rotated_heads(row_ptr, heads, dims, mask, cos_first, cos_second, sin_first, sin_second,
                   HEAD_DIM: tl.constexpr, dtype: tl.constexpr):
    """The two rotated halves ([heads, half]) of the heads of one token's row, in `dtype`."""
    half: tl.constexpr = HEAD_DIM // 2
    first = row_ptr + heads[:, None] * HEAD_DIM + dims[None, :]
    x_first = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x_second = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    rotated_first = _round(x_first * cos_first, dtype) + _round(-x_second * sin_first, dtype)
    rotated_second = _round(x_second * cos_second, dtype) + _round(x_first * sin_second, dtype)
    return _round(rotated_first, dtype).to(dtype), _round(rotated_second, dtype).to(dtype)


@triton.jit
def _rotary_write_kv_kernel(
    query_ptr,
    key_ptr,
    value_ptr,
    cos_ptr,
    sin_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_scales_ptr,
    value_scales_ptr,
    slot_mapping_ptr,
    stride_query_token,
    stride_key_token,
    stride_value_token,
    stride_cos_token,
    stride_sin_token,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    num_heads,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    KV_HEADS_PAD: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    token = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    dtype: tl.constexpr = query_ptr.dtype.element_ty
    dims = tl.arange(0, HALF_PAD)
    dim_valid = dims < half
    cos_row = cos_ptr + token * stride_cos_token
    sin_row = sin_ptr + token * stride_sin_token
    cos_first = tl.load(cos_row + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    cos_second = tl.load(cos_row + half + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    sin_first = tl.load(sin_row + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    sin_second = tl.load(sin_row + half + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]

    # Query heads: rotated in place (attention reads them next).
    heads = tl.arange(0, HEADS_PAD)
    mask = (heads < num_heads)[:, None] & dim_valid[None, :]
    query_row = query_ptr + token * stride_query_token
    rotated_first, rotated_second = _rotated_heads(
        query_row, heads, dims, mask, cos_first, cos_second, sin_first, sin_second, HEAD_DIM, dtype
    )
    query_first = query_row + heads[:, None] * HEAD_DIM + dims[None, :]
    tl.store(query_first, rotated_first, mask=mask)
    tl.store(query_first + half, rotated_second, mask=mask)

    # Key heads rotated, and value heads as they are, straight into the token's cache slot.
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # a padding token: no write
        return
    kv_heads = tl.arange(0, KV_HEADS_PAD)
    kv_mask = (kv_heads < num_kv_heads)[:, None] & dim_valid[None, :]
    cache_first = (
        (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_token
        + kv_heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    key_first, key_second = _rotated_heads(
        key_ptr + token * stride_key_token, kv_heads, dims, kv_mask,
        cos_first, cos_second, sin_first, sin_second, HEAD_DIM, dtype,
    )
    value_first = value_ptr + token * stride_value_token + kv_heads[:, None] * HEAD_DIM + dims[None, :]
    values_first = tl.load(value_first, mask=kv_mask, other=0.0)
    values_second = tl.load(value_first + half, mask=kv_mask, other=0.0)
    if INT8_KV:
        # Each head quantized over both halves (fitserve.attention.triton_int8); its scale
        # goes to [slot, head] of the scales ([num_blocks, block_size, num_kv_heads]).
        scale_offsets = slot * num_kv_heads + kv_heads
        scale_mask = kv_heads < num_kv_heads
        store_int8_halves(key_cache_ptr, key_scales_ptr, cache_first, half, key_first.to(tl.float32),
                          key_second.to(tl.float32), scale_offsets, kv_mask, scale_mask)
        store_int8_halves(value_cache_ptr, value_scales_ptr, cache_first, half, values_first.to(tl.float32),
                          values_second.to(tl.float32), scale_offsets, kv_mask, scale_mask)
    else:
        cache_dtype: tl.constexpr = key_cache_ptr.dtype.element_ty
        tl.store(key_cache_ptr + cache_first, key_first.to(cache_dtype), mask=kv_mask)
        tl.store(key_cache_ptr + cache_first + half, key_second.to(cache_dtype), mask=kv_mask)
        tl.store(value_cache_ptr + cache_first, values_first.to(cache_dtype), mask=kv_mask)
        tl.store(value_cache_ptr + cache_first + half, values_second.to(cache_dtype), mask=kv_mask)


def rotary_and_write_kv(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> None:
    """One launch for what follows the QKV projection: rotate `query` ([tokens, heads,
    head_dim]) in place, and store the rotated `key` and the `value` ([tokens, kv_heads,
    head_dim]) into their cache slots, as `apply_rotary` and the attention backend's
    `write_kv` would (tokens whose slot is negative are not stored); into an int8 cache
    (`key_scales`/`value_scales` given, contiguous) quantized as `write_kv` quantizes. `key` itself is left
    unrotated: attention reads keys from the cache. Each may be a strided view of the fused
    QKV output; within a token its heads must be contiguous."""
    check_device(query)
    tokens, num_heads, head_dim = query.shape
    num_kv_heads = key.shape[1]
    for tensor in (query, key, value):
        assert tensor.stride(2) == 1 and tensor.stride(1) == head_dim, "heads must be contiguous within a token"
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1 and head_dim % 2 == 0
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    int8 = key_scales is not None and value_scales is not None
    assert not int8 or (key_scales.is_contiguous() and value_scales.is_contiguous())
    if tokens:
        heads_pad, half_pad = next_power_of_2(num_heads), next_power_of_2(head_dim // 2)
        _rotary_write_kv_kernel[(tokens,)](
            query, key, value, cos, sin, key_cache, value_cache,
            key_scales if int8 else key_cache, value_scales if int8 else value_cache,  # unread when float
            slot_mapping,
            query.stride(0), key.stride(0), value.stride(0), cos.stride(0), sin.stride(0),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            num_heads, num_kv_heads,
            BLOCK_SIZE=key_cache.shape[1], HEAD_DIM=head_dim, HALF_PAD=half_pad, HEADS_PAD=heads_pad,
            KV_HEADS_PAD=next_power_of_2(num_kv_heads), INT8_KV=int8,
            num_warps=_num_warps(heads_pad * half_pad), enable_fp_fusion=False,
        )


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in_row, stride_out_row, intermediate, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < intermediate
    gate_row = gate_up_ptr + row * stride_in_row
    gate = tl.load(gate_row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_row + intermediate + cols, mask=mask, other=0.0).to(tl.float32)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    activated = _round(gate / (1.0 + tl.exp(-gate)), dtype)  # F.silu, rounded
    tl.store(out_ptr + row * stride_out_row + cols, _round(activated * up, dtype).to(dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] ([rows, 2 * intermediate]), the fused gate
    and up projections' output; returns [rows, intermediate]."""
    check_device(gate_up)
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    rows, width = gate_up.shape
    intermediate = width // 2
    out = torch.empty((rows, intermediate), dtype=gate_up.dtype, device=gate_up.device)
    if rows:
        _silu_mul_kernel[(rows, triton.cdiv(intermediate, SILU_BLOCK))](
            gate_up, out, gate_up.stride(0), out.stride(0), intermediate, BLOCK=SILU_BLOCK, num_warps=4,
        )
    return out

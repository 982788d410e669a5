"""The small per-layer ops of the GPU path as Triton kernels: RMSNorm (+ residual add),
rotary embedding in place, and SiLU·up.

Why: a decode step is memory-bound on the weights, and everything else should cost next to
nothing. In plain torch, one layer's norms, rotary and activation are ~30 small kernels
(RMSNorm alone is seven: cast, square, mean, add, rsqrt, multiply, cast, weight multiply);
each costs a few microseconds of launch and tail even inside a CUDA graph, which for
Llama-3-8B adds up to milliseconds per step next to a weight read of a few milliseconds.
Fused, a layer runs four of them.

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
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    stride_x_token,
    stride_cos_token,
    stride_sin_token,
    num_heads,
    HEAD_DIM: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    dim_valid = dims < half
    mask = (heads < num_heads)[:, None] & dim_valid[None, :]
    cos_row = cos_ptr + token * stride_cos_token
    sin_row = sin_ptr + token * stride_sin_token
    cos_first = tl.load(cos_row + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    cos_second = tl.load(cos_row + half + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    sin_first = tl.load(sin_row + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]
    sin_second = tl.load(sin_row + half + dims, mask=dim_valid, other=0.0).to(tl.float32)[None, :]

    first = x_ptr + token * stride_x_token + heads[:, None] * HEAD_DIM + dims[None, :]
    x_first = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x_second = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    # x * cos + rotate_half(x) * sin with rotate_half(x) = [-x_second, x_first]; each product
    # is rounded to the dtype before the sum, as torch's three separate ops do.
    rotated_first = _round(x_first * cos_first, dtype) + _round(-x_second * sin_first, dtype)
    rotated_second = _round(x_second * cos_second, dtype) + _round(x_first * sin_second, dtype)
    tl.store(first, _round(rotated_first, dtype).to(dtype), mask=mask)
    tl.store(first + half, _round(rotated_second, dtype).to(dtype), mask=mask)


def rotary_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_heads: int, head_dim: int) -> None:
    """Rotate, in place, the first `num_heads` heads of each row of `x` ([tokens, width]:
    the fused QKV output, whose q and k heads are adjacent, or one of q and k alone) by the
    per-token `cos`/`sin` rows ([tokens, head_dim], "rotate half" layout)."""
    check_device(x)
    assert x.stride(-1) == 1 and cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert x.shape[-1] >= num_heads * head_dim and head_dim % 2 == 0
    tokens = x.shape[0]
    if tokens:
        heads_pad = next_power_of_2(num_heads)
        half_pad = next_power_of_2(head_dim // 2)
        _rotary_kernel[(tokens,)](
            x, cos, sin, x.stride(0), cos.stride(0), sin.stride(0), num_heads,
            HEAD_DIM=head_dim, HALF_PAD=half_pad, HEADS_PAD=heads_pad,
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

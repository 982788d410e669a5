"""Dequantizing matmuls for the GPU path: `x @ W.T (+ bias)` with W stored in fitserve's integer
weight formats (w8, w4; the layouts are defined in `fitserve.quant.packing`), never
materialized in memory as floats.

Numerics. The result is what `packing.dequantize_w8/w4` followed by a float32 matmul gives,
rounded once to x's dtype, up to the order of the float32 sums. The kernels multiply x by the
integer codes (w8: q; w4: q - zero, an integer in [-15, 15]), which every input dtype holds
exactly, so tensor cores take 16-bit x as it is and still form exact products; the float32
scale is applied to the float32 sum afterwards (w8: once per output, w4: once per group).
Dequantizing to a 16-bit weight first would round it: a float16 scale times a 4-bit code
needs up to 15 significant bits, bfloat16 has 8.

Layout of the work. One program computes a [BLOCK_N output channels, BLOCK_M rows of x] tile
as `dot(codes [BLOCK_N, k], x.T [k, BLOCK_M])`: the weight is the dot's first operand, so
its tile is decoded in registers and fed to the tensor cores from there, and a handful of
decode rows (M = 1..16) pad only the dot's narrow side to 16. Each program walks a range of
K (w8: BLOCK_K columns per step; w4: one group per step, the group's bytes giving two runs
of G/2 consecutive columns after a mask and a shift, so a step is two dots with the same
scale). Every weight byte is read once per BLOCK_M rows of x.

Decode (M <= 16) is a weight-streaming GEMV: one M tile, so the parallelism comes from N
tiles and, when those do not fill the GPU (N ~ 1000 on a 132-SM H100), from splitting K
across programs (split-K) whose float32 partial sums a second small kernel adds up. Prefill
(M > 16) is a tiled matmul with large tiles; it splits K only when its tiles are too few.
`choose_config` picks the tiles; `benchmarks/gpu_quant_kernels.py` sweeps the choices.

Keyword arguments of `w8_linear` and `w4_linear`:

- out: the output tensor ([M, N] in x's dtype, rows contiguous), allocated if None.
- out_rows: int64 [N] (with `out`): output channel n goes to out[:, out_rows[n]], so the
  parts of a mixed-precision layer (MixLLM: most channels in w4, the salient ones in w8)
  each fill their own columns of one [M, N_total] tensor. The indices must be distinct and
  < N_total; they are not checked, which would wait for the GPU. `bias` follows the
  weight's own channel order.
- config: a `TileConfig` instead of `choose_config`'s (benchmarks and tuning).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fitserve.attention.triton_common import (
    MIN_DOT_SIZE,
    cdiv,
    check_device,
    dot_input_precision,
    is_interpreting,
    next_power_of_2,
)
from fitserve.attention.triton_decode import _multiprocessor_count
from fitserve.kernels.triton_ops import _round
from fitserve.quant.packing import check_group_size

DECODE_MAX_ROWS = 16
"""Rows of x up to which the decode configuration (one 16-row tile, split-K) is used: the
dot's narrow side cannot be smaller than 16, so up to 16 rows cost one pass over the weight."""

ASSUMED_MULTIPROCESSORS = 132
"""SM count assumed when there is no CUDA device (the interpreter): an H100's."""

PROGRAMS_PER_MULTIPROCESSOR = 2
"""Programs wanted per SM before K is split: enough for one to load while another computes."""

MIN_STEPS_PER_SPLIT = 2
"""K steps (w8: BLOCK_K columns, w4: one group) each split-K program gets at least."""

MAX_SPLIT_K = 16
"""Upper bound on K splits: each costs a float32 partial [M, N] written and read back."""


@dataclass(frozen=True)
class TileConfig:
    """How one launch cuts the work; see the module docstring.

    block_m: rows of x per program (>= 16, a power of two).
    block_n: output channels per program (>= 16, a power of two).
    block_k: w8 only, input columns per K step (>= 16, a power of two); w4 steps one group.
    split_k: programs sharing one output tile's K range (1: no partial sums, no second launch).
    num_warps, num_stages: Triton launch options (stages = loads kept in flight).
    """

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if value < MIN_DOT_SIZE or value & (value - 1):
                raise ValueError(f"TileConfig.{name} must be a power of two >= {MIN_DOT_SIZE} (got {value})")
        if self.split_k < 1:
            raise ValueError(f"TileConfig.split_k must be >= 1 (got {self.split_k})")


def choose_config(
    rows: int, out_features: int, in_features: int, dtype: torch.dtype, device: torch.device,
    group_size: int | None = None,
) -> TileConfig:
    """Tiles for x [rows, in_features] times a w8 weight (group_size None) or a w4 weight
    with `out_features` rows.

    Decode (rows <= DECODE_MAX_ROWS): 16-row tiles, narrow N tiles (32 below ~2000 outputs,
    else 64), 128-column w8 steps and 4 stages of loads in flight, since the weight stream
    is the whole cost. Prefill: 128 x 128 output tiles for 16-bit x (the usual tensor-core
    GEMM tile) with 64-column w8 steps, smaller for short prompts and for float32 x, whose
    exact dots stage twice the bytes; 3 stages, or 2 for w4 groups of more than 64 columns
    (a step then stages twice the x bytes: 2 x 32 KiB of bfloat16 at G = 128, which 3
    stages would take past the ~99 KiB of shared memory consumer GPUs have).
    Then K is split until there are PROGRAMS_PER_MULTIPROCESSOR programs per SM.
    """
    if device.type == "cuda":
        device_index = device.index if device.index is not None else torch.cuda.current_device()
        multiprocessors = _multiprocessor_count(device_index)
    else:
        multiprocessors = ASSUMED_MULTIPROCESSORS
    wide = dtype != torch.float32
    if rows <= DECODE_MAX_ROWS:
        block_m = MIN_DOT_SIZE
        block_n = 64 if out_features >= 16 * multiprocessors else 32
        block_k, num_warps, num_stages = (128 if wide else 64), 4, 4
    else:
        block_m = min(128 if wide else 32, max(32, next_power_of_2(rows)))
        block_n = 128 if wide else 32
        block_k = 64 if wide else 32
        num_warps = 8 if block_m * block_n >= 128 * 64 else 4
        num_stages = 2 if not wide or (group_size or 0) > 64 else 3
    k_steps = cdiv(in_features, block_k) if group_size is None else in_features // group_size
    tiles = max(1, cdiv(rows, block_m) * cdiv(out_features, block_n))
    wanted = PROGRAMS_PER_MULTIPROCESSOR * multiprocessors
    split_k = max(1, min(cdiv(wanted, tiles), k_steps // MIN_STEPS_PER_SPLIT, MAX_SPLIT_K))
    return TileConfig(block_m, block_n, block_k, split_k, num_warps, num_stages)


@triton.jit
def _small_integers(values, offset, OPERAND: tl.constexpr):
    """`values - offset` in the dot's operand type, for integers 0..15 (w4 codes and zeros).

    For 16-bit operands without an integer-to-float conversion: OR-ing a code into the low
    mantissa bits of 128.0 (bfloat16 0x4300) or 1024.0 (float16 0x6400) gives exactly
    128 + code (1024 + code), and the difference of two such numbers is the exact integer.
    """
    if OPERAND == tl.bfloat16:
        biased = (values.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
        return biased - (offset.to(tl.uint16) | 0x4300).to(tl.bfloat16, bitcast=True)
    elif OPERAND == tl.float16:
        biased = (values.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
        return biased - (offset.to(tl.uint16) | 0x6400).to(tl.float16, bitcast=True)
    else:
        return values.to(tl.float32) - offset.to(tl.float32)


@triton.jit
def _finish_tile(acc, channels, channel_valid, rows, row_valid, bias_ptr, out_rows_ptr, out_ptr,
                 stride_out_row, HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr):
    """Add the bias to a float32 [BLOCK_N, BLOCK_M] tile, round it once to the output dtype and
    store it at out[row, channel], or out[row, out_rows[channel]] when SCATTER."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)[:, None]
    if SCATTER:
        columns = tl.load(out_rows_ptr + channels, mask=channel_valid, other=0)
    else:
        columns = channels.to(tl.int64)
    dtype: tl.constexpr = out_ptr.dtype.element_ty
    pointers = out_ptr + rows.to(tl.int64)[None, :] * stride_out_row + columns[:, None]
    tl.store(pointers, _round(acc, dtype).to(dtype), mask=channel_valid[:, None] & row_valid[None, :])


@triton.jit
def _quant_matmul_kernel(
    x_ptr,
    qweight_ptr,
    scales_ptr,
    zeros_ptr,
    bias_ptr,
    out_rows_ptr,
    out_ptr,
    partial_ptr,
    num_rows,
    out_features,
    in_features,
    stride_x_row,
    stride_qweight,
    stride_scales,
    stride_zeros,
    stride_out_row,
    steps_per_split,
    BITS: tl.constexpr,
    GROUP_HALF: tl.constexpr,
    GROUP_HALF_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    SPLIT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCATTER: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    """One [BLOCK_N channels, BLOCK_M rows] output tile over one split's K steps. With SPLIT,
    the float32 sum goes to partial[split, row, channel] for `_split_k_reduce_kernel`."""
    row_tile = tl.program_id(0)
    channel_tile = tl.program_id(1)
    split = tl.program_id(2)
    # The interpreter cannot do arithmetic on bfloat16 (see triton_common.is_interpreting).
    OPERAND: tl.constexpr = tl.float32 if UPCAST_OPERANDS else x_ptr.dtype.element_ty
    rows = row_tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    channels = channel_tile * BLOCK_N + tl.arange(0, BLOCK_N)
    channel_valid = channels < out_features
    x_rows = x_ptr + rows.to(tl.int64)[None, :] * stride_x_row
    weight_rows = qweight_ptr + channels.to(tl.int64)[:, None] * stride_qweight
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if BITS == 8:
        total_steps = tl.cdiv(in_features, BLOCK_K)
    else:
        total_steps = in_features // (2 * GROUP_HALF)
    first_step = split * steps_per_split
    last_step = tl.minimum(first_step + steps_per_split, total_steps)
    if BITS == 8:
        for step in range(first_step, last_step):
            columns = step * BLOCK_K + tl.arange(0, BLOCK_K)
            if EVEN_K:
                codes = tl.load(weight_rows + columns[None, :], mask=channel_valid[:, None], other=0)
                x_t = tl.load(x_rows + columns[:, None], mask=row_valid[None, :], other=0.0)
            else:
                column_valid = columns < in_features
                codes = tl.load(weight_rows + columns[None, :],
                                mask=channel_valid[:, None] & column_valid[None, :], other=0)
                x_t = tl.load(x_rows + columns[:, None], mask=column_valid[:, None] & row_valid[None, :], other=0.0)
            acc = tl.dot(codes.to(OPERAND), x_t.to(OPERAND), acc, input_precision=INPUT_PRECISION)
        # Symmetric per-channel scale: one multiply of the whole sum.
        acc *= tl.load(scales_ptr + channels, mask=channel_valid, other=0.0).to(tl.float32)[:, None]
    else:
        half = tl.arange(0, GROUP_HALF_PAD)
        half_valid = half < GROUP_HALF
        for group in range(first_step, last_step):
            packed = tl.load(weight_rows + group * GROUP_HALF + half[None, :],
                             mask=channel_valid[:, None] & half_valid[None, :], other=0)
            zero = tl.load(zeros_ptr + channels * stride_zeros + group, mask=channel_valid, other=0)[:, None]
            scale = tl.load(scales_ptr + channels * stride_scales + group, mask=channel_valid, other=0.0)
            # Low nibbles are the group's first G/2 columns, high nibbles its last G/2 (packing.py).
            first_columns = group * 2 * GROUP_HALF + half
            x_valid = half_valid[:, None] & row_valid[None, :]
            x_first = tl.load(x_rows + first_columns[:, None], mask=x_valid, other=0.0)
            x_second = tl.load(x_rows + (first_columns + GROUP_HALF)[:, None], mask=x_valid, other=0.0)
            group_sum = tl.dot(_small_integers(packed & 0xF, zero, OPERAND), x_first.to(OPERAND),
                               input_precision=INPUT_PRECISION)
            group_sum = tl.dot(_small_integers(packed >> 4, zero, OPERAND), x_second.to(OPERAND), group_sum,
                               input_precision=INPUT_PRECISION)
            acc += group_sum * scale.to(tl.float32)[:, None]
    if SPLIT:
        partial = (partial_ptr + (split * num_rows + rows.to(tl.int64))[None, :] * out_features
                   + channels[:, None])
        tl.store(partial, acc, mask=channel_valid[:, None] & row_valid[None, :])
    else:
        _finish_tile(acc, channels, channel_valid, rows, row_valid, bias_ptr, out_rows_ptr, out_ptr,
                     stride_out_row, HAS_BIAS, SCATTER)


@triton.jit
def _split_k_reduce_kernel(
    partial_ptr,
    bias_ptr,
    out_rows_ptr,
    out_ptr,
    num_rows,
    out_features,
    num_splits,
    stride_out_row,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SCATTER: tl.constexpr,
):
    """out = sum over splits of partial[split] (+ bias), rounded once, for one output tile."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = rows < num_rows
    channels = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    channel_valid = channels < out_features
    mask = channel_valid[:, None] & row_valid[None, :]
    offsets = rows.to(tl.int64)[None, :] * out_features + channels[:, None]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for split in range(num_splits):
        acc += tl.load(partial_ptr + split * num_rows * out_features + offsets, mask=mask, other=0.0)
    _finish_tile(acc, channels, channel_valid, rows, row_valid, bias_ptr, out_rows_ptr, out_ptr,
                 stride_out_row, HAS_BIAS, SCATTER)


REDUCE_BLOCK_N = 128
"""Output channels per program of the split-K reduction (a memory-bound elementwise pass)."""


def w8_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantize_w8(qweight [N, K] int8, scales [N] float32).T (+ bias [N]), in x's
    dtype; returns `out` (see the module docstring for `out`, `out_rows` and `config`)."""
    _check_x(x)
    rows, in_features = x.shape
    if qweight.dtype != torch.int8 or qweight.dim() != 2 or qweight.shape[1] != in_features:
        raise ValueError(f"w8 qweight must be int8 [N, {in_features}] (got {qweight.dtype} {list(qweight.shape)})")
    out_features = qweight.shape[0]
    if scales.shape != (out_features,) or scales.dtype != torch.float32:
        raise ValueError(f"w8 scales must be float32 [{out_features}] (got {scales.dtype} {list(scales.shape)})")
    if config is None:
        config = choose_config(rows, out_features, in_features, x.dtype, x.device)
    steps = cdiv(in_features, config.block_k)
    return _launch(x, qweight, scales, scales, bias, out, out_rows, config, steps, bits=8, group_half=0,
                   even_k=in_features % config.block_k == 0)


def w4_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    out_rows: torch.Tensor | None = None,
    config: TileConfig | None = None,
) -> torch.Tensor:
    """x [M, K] @ dequantize_w4(qweight [N, K/2] uint8, scales [N, K/G] float16, zeros
    [N, K/G] uint8, G).T (+ bias [N]), in x's dtype; returns `out` (see the module
    docstring for `out`, `out_rows` and `config`; `config.block_k` is unused, w4 steps one
    group at a time)."""
    _check_x(x)
    rows, in_features = x.shape
    check_group_size(in_features, group_size)
    if qweight.dtype != torch.uint8 or qweight.dim() != 2 or qweight.shape[1] * 2 != in_features:
        raise ValueError(
            f"w4 qweight must be uint8 [N, {in_features // 2}] (got {qweight.dtype} {list(qweight.shape)})"
        )
    out_features, groups = qweight.shape[0], in_features // group_size
    for name, tensor, dtype in (("scales", scales, torch.float16), ("zeros", zeros, torch.uint8)):
        if tensor.shape != (out_features, groups) or tensor.dtype != dtype or tensor.stride(1) != 1:
            raise ValueError(
                f"w4 {name} must be {str(dtype).removeprefix('torch.')} [{out_features}, {groups}] with "
                f"contiguous rows (got {tensor.dtype} {list(tensor.shape)})"
            )
    if config is None:
        config = choose_config(rows, out_features, in_features, x.dtype, x.device, group_size)
    return _launch(x, qweight, scales, zeros, bias, out, out_rows, config, groups, bits=4,
                   group_half=group_size // 2, even_k=True)


def _check_x(x: torch.Tensor) -> None:
    """Fail early, in one line, on activations the kernels cannot take."""
    check_device(x)
    if x.dim() != 2 or x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be a 2-D float32/bfloat16/float16 tensor (got {x.dtype} {list(x.shape)})")


def _launch(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor | None,
    out_rows: torch.Tensor | None,
    config: TileConfig,
    steps: int,
    bits: int,
    group_half: int,
    even_k: bool,
) -> torch.Tensor:
    """Check the arguments both formats share, then launch one weight's matmul (and, with
    more than one K split, the reduction). `steps`: K steps of the weight (w8 tiles, w4 groups)."""
    rows, in_features = x.shape
    out_features = qweight.shape[0]
    for tensor in (qweight, scales, zeros, bias, out, out_rows):
        if tensor is not None and tensor.device != x.device:
            raise ValueError(f"every tensor must be on x's device {x.device} (got one on {tensor.device})")
    if x.stride(1) != 1:
        x = x.contiguous()
    if qweight.stride(1) != 1:
        raise ValueError("qweight rows must be contiguous")
    if bias is not None and bias.shape != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}] (got {list(bias.shape)})")
    if out_rows is not None:
        if out is None:
            raise ValueError("out_rows needs the output tensor `out` whose columns it names")
        if out_rows.shape != (out_features,) or out_rows.dtype != torch.int64:
            raise ValueError(f"out_rows must be int64 [{out_features}] (got {out_rows.dtype} {list(out_rows.shape)})")
    if out is None:
        out = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    else:
        wanted_columns = "N_total" if out_rows is not None else str(out_features)
        if (out.dim() != 2 or out.shape[0] != rows or out.dtype != x.dtype or out.stride(1) != 1
                or (out_rows is None and out.shape[1] != out_features)):
            raise ValueError(
                f"out must be {x.dtype} [{rows}, {wanted_columns}] with contiguous rows "
                f"(got {out.dtype} {list(out.shape)})"
            )
    if rows == 0 or out_features == 0:
        return out
    split_k = min(config.split_k, steps)
    steps_per_split = cdiv(steps, split_k)
    split_k = cdiv(steps, steps_per_split)  # no split left without steps
    partial = (torch.empty((split_k, rows, out_features), dtype=torch.float32, device=x.device)
               if split_k > 1 else out)
    flags = dict(HAS_BIAS=bias is not None, SCATTER=out_rows is not None)
    grid = (cdiv(rows, config.block_m), cdiv(out_features, config.block_n), split_k)
    _quant_matmul_kernel[grid](
        x, qweight, scales, zeros, bias if bias is not None else scales,
        out_rows if out_rows is not None else scales, out, partial,
        rows, out_features, in_features,
        x.stride(0), qweight.stride(0), scales.stride(0), zeros.stride(0), out.stride(0), steps_per_split,
        BITS=bits, GROUP_HALF=max(group_half, 1), GROUP_HALF_PAD=max(MIN_DOT_SIZE, next_power_of_2(group_half)),
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, EVEN_K=even_k,
        SPLIT=split_k > 1, UPCAST_OPERANDS=is_interpreting() and x.dtype == torch.bfloat16,
        INPUT_PRECISION=dot_input_precision(x.dtype), **flags,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split_k > 1:
        reduce_block_m = min(DECODE_MAX_ROWS, next_power_of_2(rows))
        _split_k_reduce_kernel[(cdiv(rows, reduce_block_m), cdiv(out_features, REDUCE_BLOCK_N))](
            partial, bias if bias is not None else scales, out_rows if out_rows is not None else scales, out,
            rows, out_features, split_k, out.stride(0),
            BLOCK_M=reduce_block_m, BLOCK_N=REDUCE_BLOCK_N, **flags, num_warps=4,
        )
    return out

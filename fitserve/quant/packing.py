"""The storage layouts of fitserve's integer weight formats, in plain PyTorch.

These functions define the formats: the CPU and Triton kernels must compute exactly what
`dequantize_w8` / `dequantize_w4` followed by a float32 matmul computes (up to summation order),
and `fitserve quantize` writes tensors in these layouts.

w8 (symmetric, per output channel)
    qweight int8 [N, K], scales float32 [N]:  w[n, k] = qweight[n, k] * scales[n].

w4 (asymmetric, per group of G input columns, G even; 128 by default)
    qweight uint8 [N, K // 2], scales float16 [N, K // G], zeros uint8 [N, K // G] (0..15):
    w[n, k] = (q[n, k] - zeros[n, g]) * scales[n, g] with g = k // G, computed in float32.
    Within group g of a row, byte i (0 <= i < G/2) of the group's G/2 bytes holds column
    g*G + i in its low nibble and column g*G + G/2 + i in its high nibble. Why that order:
    one vector load of a group's bytes gives, after a mask and a shift, two runs of
    consecutive columns (no interleaving shuffles in the kernels), for any vector width
    that divides G/2.

The scale is rounded to float16 before the codes are chosen, so the stored scale is the one
the codes were rounded against.
"""

from __future__ import annotations

import torch

W4_MAX_CODE = 15
W8_MAX_CODE = 127


def quantize_w8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric int8 with one float32 scale per output row (row = channel)."""
    weight = weight.float()
    scales = weight.abs().amax(dim=1) / W8_MAX_CODE
    scales = torch.where(scales > 0, scales, torch.ones_like(scales))
    qweight = torch.clamp(torch.round(weight / scales[:, None]), -W8_MAX_CODE, W8_MAX_CODE).to(torch.int8)
    return qweight, scales


def dequantize_w8(qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The float32 weight [N, K] an int8 tensor and its row scales stand for."""
    return qweight.float() * scales.float()[:, None]


def w4_scales_and_zeros(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float16 scales and integer zeros (0..15) that map [low, high] (per group, low <= 0 <=
    high) onto the 16 codes. Zero is kept exactly representable, as the format requires."""
    scales = ((high - low) / W4_MAX_CODE).to(torch.float16)
    tiny = torch.finfo(torch.float16).tiny
    scales = torch.where(scales.float() > 0, scales, torch.full_like(scales, tiny))
    zeros = torch.clamp(torch.round(-low / scales.float()), 0, W4_MAX_CODE).to(torch.uint8)
    return scales, zeros


def w4_codes(weight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Nearest codes [N, K] (uint8, 0..15) of `weight` for given group scales and zeros."""
    rows, columns = weight.shape
    grouped = weight.float().view(rows, columns // group_size, group_size)
    codes = torch.round(grouped / scales.float()[..., None] + zeros.float()[..., None])
    return torch.clamp(codes, 0, W4_MAX_CODE).to(torch.uint8).view(rows, columns)


def quantize_w4(weight: torch.Tensor, group_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest asymmetric 4-bit: (qweight, scales, zeros) in the w4 layout.
    Each group's range is [min(w, 0), max(w, 0)] so that zero stays exactly representable."""
    check_group_size(weight.shape[1], group_size)
    rows, columns = weight.shape
    grouped = weight.float().view(rows, columns // group_size, group_size)
    low = grouped.amin(dim=-1).clamp(max=0)
    high = grouped.amax(dim=-1).clamp(min=0)
    scales, zeros = w4_scales_and_zeros(low, high)
    return pack_w4(w4_codes(weight, scales, zeros, group_size), group_size), scales, zeros


def check_group_size(columns: int, group_size: int) -> None:
    """Raise ValueError unless `group_size` is even and divides `columns`."""
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group size must be an even number >= 2 (got {group_size})")
    if columns % group_size:
        raise ValueError(f"group size {group_size} does not divide the input width {columns}")


def pack_w4(codes: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K] codes 0..15 -> [N, K // 2] bytes in the w4 layout (see the module docstring)."""
    rows, columns = codes.shape
    check_group_size(columns, group_size)
    grouped = codes.to(torch.uint8).view(rows, columns // group_size, 2, group_size // 2)
    packed = grouped[:, :, 0, :] | (grouped[:, :, 1, :] << 4)
    return packed.reshape(rows, columns // 2).contiguous()


def unpack_w4(qweight: torch.Tensor, group_size: int) -> torch.Tensor:
    """[N, K // 2] bytes in the w4 layout -> [N, K] codes 0..15 (uint8)."""
    rows, half = qweight.shape
    grouped = qweight.view(rows, (2 * half) // group_size, group_size // 2)
    low, high = grouped & 0x0F, grouped >> 4
    return torch.stack([low, high], dim=2).reshape(rows, 2 * half)


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weight [N, K] a w4 tensor stands for."""
    codes = unpack_w4(qweight, group_size).float()
    rows, columns = codes.shape
    grouped = codes.view(rows, columns // group_size, group_size)
    weight = (grouped - zeros.float()[..., None]) * scales.float()[..., None]
    return weight.view(rows, columns)


LANE_ROWS = 16
"""Output rows per block of the w4 lanes layout (the int32 lanes of a 512-bit vector)."""


def _lane_blocks(rows: int) -> list[tuple[int, int]]:
    """(first row, rows) of each block of the lanes layout: 16 rows, the last the rows left."""
    return [(first, min(LANE_ROWS, rows - first)) for first in range(0, rows, LANE_ROWS)]


def pack_w4_lanes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w4 tensors -> the same tensors (shapes and bytes) in the lanes layout that the AVX-512 VNNI
    kernel reads (fitserve/kernels/cpu_quant_lanes_layout.h): blocks of 16 output rows; within
    a block, per 8 columns k..k+7, 4 bytes per row whose byte j holds column k+j (low nibble)
    and k+4+j (high nibble); scales and zeros per block as [groups, rows of the block]."""
    rows, columns = qweight.shape[0], 2 * qweight.shape[1]
    if group_size % 8:
        raise ValueError(f"the lanes layout needs a group size that is a multiple of 8 (got {group_size})")
    codes = unpack_w4(qweight, group_size).view(rows, columns // 8, 2, 4)
    steps = codes[:, :, 0, :] | (codes[:, :, 1, :] << 4)  # [N, K/8, 4]
    packed, packed_scales, packed_zeros = [], [], []
    for first, count in _lane_blocks(rows):
        packed.append(steps[first:first + count].transpose(0, 1).reshape(-1))
        packed_scales.append(scales[first:first + count].t().reshape(-1))
        packed_zeros.append(zeros[first:first + count].t().reshape(-1))
    return (torch.cat(packed).view(qweight.shape), torch.cat(packed_scales).view(scales.shape),
            torch.cat(packed_zeros).view(zeros.shape))


def unpack_w4_lanes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The inverse of `pack_w4_lanes`: tensors in the lanes layout back in the w4 layout."""
    rows, half = qweight.shape
    groups = scales.shape[1]
    flat_codes, flat_scales, flat_zeros = qweight.reshape(-1), scales.reshape(-1), zeros.reshape(-1)
    steps, row_scales, row_zeros = [], [], []
    for first, count in _lane_blocks(rows):
        steps.append(flat_codes[first * half:(first + count) * half].view(half // 4, count, 4).transpose(0, 1))
        row_scales.append(flat_scales[first * groups:(first + count) * groups].view(groups, count).t())
        row_zeros.append(flat_zeros[first * groups:(first + count) * groups].view(groups, count).t())
    step_bytes = torch.cat(steps)  # [N, K/8, 4]
    codes = torch.stack([step_bytes & 0x0F, step_bytes >> 4], dim=2).reshape(rows, 2 * half)
    return pack_w4(codes, group_size), torch.cat(row_scales).contiguous(), torch.cat(row_zeros).contiguous()


def pack_w8_lanes(qweight: torch.Tensor) -> torch.Tensor:
    """w8 codes [N, K] -> the same tensor (shape and bytes) in the lanes layout that the AVX-512
    VNNI kernel reads (fitserve/kernels/cpu_quant_lanes_layout.h): blocks of 16 output rows;
    within a block, per 4 columns k..k+3, the 4 bytes of each row in turn. Scales are unchanged."""
    rows, columns = qweight.shape
    if columns % 4:
        raise ValueError(f"the w8 lanes layout needs in_features a multiple of 4 (got {columns})")
    steps = qweight.view(rows, columns // 4, 4)
    return torch.cat([steps[first:first + count].transpose(0, 1).reshape(-1)
                      for first, count in _lane_blocks(rows)]).view(qweight.shape)


def unpack_w8_lanes(qweight: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack_w8_lanes`."""
    rows, columns = qweight.shape
    flat = qweight.reshape(-1)
    return torch.cat([flat[first * columns:(first + count) * columns].view(columns // 4, count, 4).transpose(0, 1)
                      for first, count in _lane_blocks(rows)]).reshape(rows, columns)


def w8_lanes_rows(qweight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (int64, any shape) of w8 codes held in the lanes layout, as int8 [*rows.shape, K]
    in column order: one gather that reads only those rows' bytes (an embedding lookup into the
    matrix a tied w8 LM head holds in that layout)."""
    count, columns = qweight.shape
    flat_rows = rows.reshape(-1)
    block, lane = flat_rows // LANE_ROWS, flat_rows % LANE_ROWS
    block_rows = torch.clamp(count - block * LANE_ROWS, max=LANE_ROWS)
    k = torch.arange(columns, device=qweight.device)
    index = ((block * LANE_ROWS * columns + 4 * lane)[:, None] + (k // 4 * 4)[None, :] * block_rows[:, None]
             + (k % 4)[None, :])
    return qweight.reshape(-1)[index].view(*rows.shape, columns)


def w8_bits_per_weight(in_features: int) -> float:
    """Stored bits per weight of w8: 8 for the code plus a float32 scale per row of `in_features`."""
    return 8 + 32 / in_features


def w4_bits_per_weight(group_size: int) -> float:
    """Stored bits per weight of w4: 4 for the code plus a float16 scale and a uint8 zero per group."""
    return 4 + (16 + 8) / group_size

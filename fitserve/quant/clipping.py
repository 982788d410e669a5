"""Clipping-range search for 4-bit groups: shrink each group's [min, max] range when the
codes it buys in the middle reduce the error more than clipping the extremes costs.

Round-to-nearest maps a group's full range onto 16 codes, so a single outlier stretches
every step. Trying shrink factors per group and keeping the one with the least error is a
cheap standard refinement (used by AWQ, llama.cpp's k-quants and others; the idea only, the
code is ours). The error is weighted per input column by `importance`, the mean square of the
calibration activations that multiply that column: output error, not weight error, is what
the loss sees.
"""

from __future__ import annotations

import torch

from fitserve.quant import packing

SHRINK_FACTORS = tuple(1.0 - 0.025 * step for step in range(21))
"""Range scales tried per group: 1.0 (round to nearest) down to 0.5."""


def search_w4(weight: torch.Tensor, group_size: int,
              importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qweight, scales, zeros) in the w4 layout with each group's range chosen from
    SHRINK_FACTORS to minimise the importance-weighted squared error."""
    packing.check_group_size(weight.shape[1], group_size)
    rows, columns = weight.shape
    grouped = weight.float().view(rows, columns // group_size, group_size)
    column_weight = (torch.ones(columns) if importance is None else importance.float().clamp_min(1e-12))
    column_weight = column_weight.view(1, columns // group_size, group_size)
    low = grouped.amin(dim=-1).clamp(max=0)
    high = grouped.amax(dim=-1).clamp(min=0)
    best_error = torch.full(low.shape, float("inf"))
    best_scales = torch.empty(low.shape, dtype=torch.float16)
    best_zeros = torch.empty(low.shape, dtype=torch.uint8)
    for factor in SHRINK_FACTORS:
        scales, zeros = packing.w4_scales_and_zeros(low * factor, high * factor)
        codes = packing.w4_codes(weight, scales, zeros, group_size).view_as(grouped).float()
        restored = (codes - zeros.float()[..., None]) * scales.float()[..., None]
        error = ((restored - grouped) ** 2 * column_weight).sum(dim=-1)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_scales = torch.where(better, scales, best_scales)
        best_zeros = torch.where(better, zeros, best_zeros)
    codes = packing.w4_codes(weight, best_scales, best_zeros, group_size)
    return packing.pack_w4(codes, group_size), best_scales, best_zeros

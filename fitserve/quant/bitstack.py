"""BitStack's decomposition of one weight matrix into a stack of ~1-bit residual blocks.

Starting from R = W ⊙ s (each input column scaled by its activation magnitude, so errors on
busy inputs cost more), every block takes the signs of R and a rank-r approximation of |R|:

    B = sign(R) ⊙ (u @ v),  u @ v = the best rank-r approximation of |R|,  R <- R - B.

Because sign(R) ⊙ |R| = R, the new residual is sign(R) ⊙ (|R| - u @ v), whose norm is that of
|R| - u @ v: never more than |R|'s, as the truncated SVD is the best rank-r approximation and
zero is one. The block is subtracted as stored (factors rounded to float16), and a block whose
rounding would still raise the norm is stored as zero factors, so the guarantee holds for what
is loaded. The scaling is folded into v before storing (see bitstack_packing).
"""

from __future__ import annotations

import torch

from fitserve.quant import bitstack_packing


def decompose(weight: torch.Tensor, column_scales: torch.Tensor | None, num_blocks: int,
              rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stacked (signs uint8 [n, N, ceil(K/8)], u float16 [n, N, r], v float16 [n, r, K]) of
    `weight` [N, K]; `column_scales` [K] (positive) is the activation-aware scaling, or None."""
    residual = weight.float().clone()
    scales = torch.ones(weight.shape[1]) if column_scales is None else column_scales.float()
    residual *= scales
    rows, columns = residual.shape
    rank = min(rank, rows, columns)
    signs = torch.empty(num_blocks, rows, bitstack_packing.packed_columns(columns), dtype=torch.uint8)
    us = torch.zeros(num_blocks, rows, rank, dtype=torch.float16)
    vs = torch.zeros(num_blocks, rank, columns, dtype=torch.float16)
    for block in range(num_blocks):
        negative = residual < 0
        magnitude = residual.abs()
        left, singular, right = torch.linalg.svd(magnitude, full_matrices=False)
        root = singular[:rank].sqrt()
        u = (left[:, :rank] * root).half()
        stored_v = (right[:rank] * root[:, None] / scales).half()
        approximation = u.float() @ (stored_v.float() * scales)
        new_residual = torch.where(negative, -1.0, 1.0) * (magnitude - approximation)
        if torch.linalg.vector_norm(new_residual) <= torch.linalg.vector_norm(residual):
            us[block], vs[block], residual = u, stored_v, new_residual
        signs[block] = bitstack_packing.pack_signs(negative)
    return signs, us, vs

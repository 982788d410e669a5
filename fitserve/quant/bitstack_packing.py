"""The storage layout of BitStack's elastic weights, in plain PyTorch.

A matrix W [N, K] is stored as a stack of residual blocks; block b stands for

    B_b = sign_b ⊙ (u_b @ v_b)      sign_b ∈ {+1, -1} [N, K], u_b [N, r], v_b [r, K]

and a layer that has its first d blocks loaded multiplies by W_d = Σ_{b<d} B_b. The rank r
is chosen per checkpoint matrix and is the same for all of its blocks.

Tensors of one checkpoint matrix with prefix P (e.g. "model.layers.0.self_attn.q_proj"),
stacked over its n blocks so that the first d blocks are one contiguous slice:

    P.bitstack_signs  uint8   [n, N, ceil(K / 8)]  bit j of byte c is column 8c + j; a set bit
                                                   means -1, a clear bit +1 (padding bits clear)
    P.bitstack_u      float16 [n, N, r]
    P.bitstack_v      float16 [n, r, K]

Activation-aware scaling (each input column multiplied by s_k before decomposing) is folded
into v when the model is written (v[:, k] /= s_k), so the stored blocks already stand for W and
a kernel needs no extra vector. Why sign ⊙ rank-r: the signs carry one bit per weight and
|R| of a residual is smooth enough that a few singular vectors capture it (BitStack, see
../shared/PAPERS.md); computing each block as a ±1 matrix times r scaled copies of x avoids
ever rebuilding W.
"""

from __future__ import annotations

import torch

SIGNS = "bitstack_signs"
U = "bitstack_u"
V = "bitstack_v"
TENSOR_SUFFIXES = (SIGNS, U, V)


def packed_columns(in_features: int) -> int:
    """Bytes per row of packed signs."""
    return (in_features + 7) // 8


def pack_signs(negative: torch.Tensor) -> torch.Tensor:
    """uint8 [..., ceil(K / 8)] from a bool tensor [..., K] that is True where the sign is -1."""
    columns = negative.shape[-1]
    padded = torch.zeros(*negative.shape[:-1], packed_columns(columns) * 8, dtype=torch.uint8,
                         device=negative.device)
    padded[..., :columns] = negative.to(torch.uint8)
    bits = padded.view(*negative.shape[:-1], -1, 8)
    weights = (1 << torch.arange(8, dtype=torch.int32, device=negative.device)).to(torch.uint8)
    return (bits * weights).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def unpack_signs(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """float32 ±1 [..., K] from packed signs [..., ceil(K / 8)]."""
    shifts = torch.arange(8, dtype=torch.uint8, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1
    bits = bits.reshape(*packed.shape[:-1], -1)[..., :in_features]
    return 1.0 - 2.0 * bits.float()


def block_weight(signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, in_features: int) -> torch.Tensor:
    """The float32 matrix [N, K] one block stands for: sign ⊙ (u @ v), in float32."""
    return unpack_signs(signs, in_features) * (u.float() @ v.float())


def dequantize_blocks(signs: torch.Tensor, u: torch.Tensor, v: torch.Tensor, in_features: int) -> torch.Tensor:
    """Σ over the given blocks (stacked on dim 0) of `block_weight`: the float32 weight [N, K] a
    layer with these blocks loaded multiplies by (the reference of every BitStack kernel)."""
    weight = torch.zeros(signs.shape[1], in_features, device=signs.device)
    for block in range(signs.shape[0]):
        weight += block_weight(signs[block], u[block], v[block], in_features)
    return weight


def block_bytes(rows: int, in_features: int, rank: int) -> int:
    """Stored bytes of one block: packed signs plus the float16 factors."""
    return rows * packed_columns(in_features) + 2 * rank * (rows + in_features)

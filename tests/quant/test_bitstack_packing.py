"""The BitStack storage layout: signs pack to one bit per weight and back, and a block's
dequantized matrix is sign ⊙ (u @ v)."""

import torch

from fitserve.quant import bitstack_packing as bp


def test_signs_round_trip_with_odd_width() -> None:
    generator = torch.Generator().manual_seed(0)
    negative = torch.rand(3, 5, 21, generator=generator) < 0.5
    packed = bp.pack_signs(negative)
    assert packed.shape == (3, 5, 3) and packed.dtype == torch.uint8
    signs = bp.unpack_signs(packed, 21)
    assert torch.equal(signs, torch.where(negative, -1.0, 1.0))
    # padding bits of the last byte stay clear
    assert int((packed[..., -1] >> 5).max()) == 0


def test_bit_order_is_column_8c_plus_j() -> None:
    negative = torch.zeros(1, 16, dtype=torch.bool)
    negative[0, 9] = True  # byte 1, bit 1
    assert bp.pack_signs(negative).tolist() == [[0, 2]]


def test_blocks_sum_to_the_weight() -> None:
    generator = torch.Generator().manual_seed(1)
    signs = bp.pack_signs(torch.rand(2, 4, 10, generator=generator) < 0.5)
    u = torch.randn(2, 4, 3, generator=generator).half()
    v = torch.randn(2, 3, 10, generator=generator).half()
    expected = sum(bp.unpack_signs(signs[b], 10) * (u[b].float() @ v[b].float()) for b in range(2))
    assert torch.allclose(bp.dequantize_blocks(signs, u, v, 10), expected)
    assert bp.block_bytes(4, 10, 3) == 4 * 2 + 2 * 3 * 14


def test_decomposition_never_raises_the_residual_and_converges() -> None:
    from fitserve.quant.bitstack import decompose

    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 40, generator=generator)
    scales = torch.rand(40, generator=generator) + 0.5
    signs, u, v = decompose(weight, scales, num_blocks=12, rank=4)
    norms = [float(torch.linalg.vector_norm((weight - bp.dequantize_blocks(signs[:d], u[:d], v[:d], 40)) * scales))
             for d in range(13)]
    assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(norms, norms[1:]))
    assert norms[-1] < 0.2 * norms[0]

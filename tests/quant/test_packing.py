"""The w8 / w4 storage layouts (fitserve.quant.packing): what the kernels and files rely on."""

from __future__ import annotations

import pytest
import torch

from fitserve.quant import clipping, packing


def test_w4_nibble_order_puts_two_runs_of_consecutive_columns_in_each_group() -> None:
    group = 8
    codes = torch.arange(16, dtype=torch.uint8).repeat(2, 1)  # columns 0..15, two groups of 8
    packed = packing.pack_w4(codes, group)
    # group 0: byte i holds column i (low) and column i + 4 (high); group 1 likewise from 8
    assert packed[0].tolist() == [0 | 4 << 4, 1 | 5 << 4, 2 | 6 << 4, 3 | 7 << 4,
                                  8 | 12 << 4, 9 | 13 << 4, 10 | 14 << 4, 11 | 15 << 4]
    assert torch.equal(packing.unpack_w4(packed, group), codes)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_w4_round_trip_error_is_about_half_a_step_and_keeps_zero(group_size: int) -> None:
    weight = torch.randn(24, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    weight[3, :group_size] = 0.0  # an all-zero group
    weight[5, 7] = 0.0
    qweight, scales, zeros = packing.quantize_w4(weight, group_size)
    restored = packing.dequantize_w4(qweight, scales, zeros, group_size)
    step = scales.float().repeat_interleave(group_size, dim=1)
    # Half a step, plus what the float16 rounding of the scale moves the range's far end by.
    assert ((restored - weight).abs() <= step * (0.5 + 15 * 2**-11) + 1e-7).all()
    assert restored[3, :group_size].abs().max() == 0 and restored[5, 7] == 0
    assert qweight.shape == (24, 128) and qweight.dtype == torch.uint8
    assert scales.dtype == torch.float16 and zeros.dtype == torch.uint8 and int(zeros.max()) <= 15


def test_w8_is_symmetric_per_channel_within_half_a_step() -> None:
    weight = torch.randn(16, 96, generator=torch.Generator().manual_seed(1))
    weight[2] *= 100  # one channel far larger: others keep their own scale
    qweight, scales = packing.quantize_w8(weight)
    restored = packing.dequantize_w8(qweight, scales)
    assert ((restored - weight).abs() <= scales[:, None] / 2 + 1e-6).all()
    assert int(qweight.abs().max()) == 127 and scales[2] > 50 * scales[1]


def test_group_size_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        packing.quantize_w4(torch.zeros(4, 100), 64)
    with pytest.raises(ValueError, match="even"):
        packing.quantize_w4(torch.zeros(4, 99), 33)


def test_clipping_search_never_does_worse_than_round_to_nearest() -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.02
    weight[:, ::37] *= 8  # outliers stretch round-to-nearest's range
    plain = packing.dequantize_w4(*packing.quantize_w4(weight, 128), 128)
    searched = packing.dequantize_w4(*clipping.search_w4(weight, 128), 128)
    plain_error = ((plain - weight) ** 2).view(64, 2, 128).sum(-1)
    searched_error = ((searched - weight) ** 2).view(64, 2, 128).sum(-1)
    assert (searched_error <= plain_error + 1e-9).all()
    assert searched_error.sum() < 0.95 * plain_error.sum()

"""The dequantizing Triton matmuls compute what their format's definition says.

The reference is `fitserve.quant.packing`'s dequantize followed by a float32 matmul (and
bias), rounded once to x's dtype. The kernels sum in another order (per tile, per group,
per K split), so they may differ by float32 summation error, and then by one rounding to
x's dtype; `assert_matches_reference` allows exactly that and no more, which any wrong
nibble, scale, zero or column would exceed many times over.

Shapes are small and odd (the interpreter is slow): N = 37 output channels, K not a
multiple of the w8 tile, an odd number of w4 groups, M = 1 and 3 (decode tiles) and 17
(prefill tiles). On a machine without a GPU the kernels run in Triton's interpreter
(tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import triton_quant
from fitserve.kernels.triton_quant import TileConfig
from fitserve.quant import packing

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
"""Relative error of one rounding to nearest from float32 (0: the output is the float32 sum)."""

OUT_FEATURES = 37


def random(*shape: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype)


def assert_matches_reference(actual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                             bias: torch.Tensor | None) -> None:
    """|actual - reference| <= s + u * (|reference| + s), with s a float32 summation error bound
    (2K units of 2^-24 of the sum of |products|) and u the unit roundoff of x's dtype."""
    x, weight = x.float().cpu(), weight.cpu()
    reference = x @ weight.T
    magnitude = x.abs() @ weight.abs().T
    if bias is not None:
        reference += bias.float().cpu()
        magnitude += bias.float().cpu().abs()
    summation = 2 * x.shape[1] * 2.0**-24 * magnitude
    tolerance = summation + UNIT_ROUNDOFF[actual.dtype] * (reference.abs() + summation)
    error = (actual.float().cpu() - reference).abs()
    assert (error <= tolerance).all(), f"max error {error.max():.3g}, worst excess {(error - tolerance).max():.3g}"


def w8_weight(out_features: int, in_features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    qweight, scales = packing.quantize_w8(random(out_features, in_features, seed=seed))
    return qweight.to(DEVICE), scales.to(DEVICE)


def w4_weight(out_features: int, in_features: int, group_size: int, seed: int) -> tuple[torch.Tensor, ...]:
    packed = packing.quantize_w4(random(out_features, in_features, seed=seed), group_size)
    return tuple(tensor.to(DEVICE) for tensor in packed)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("in_features", [97, 256])
def test_w8_linear_equals_dequantize_then_matmul(dtype: torch.dtype, rows: int, in_features: int) -> None:
    """97 columns end in a partial K tile; 256 take the unmasked path. Odd row counts carry a bias."""
    qweight, scales = w8_weight(OUT_FEATURES, in_features, seed=rows)
    x = random(rows, in_features, seed=100 + rows, dtype=dtype).to(DEVICE)
    bias = random(OUT_FEATURES, seed=200, dtype=dtype).to(DEVICE) if rows % 2 else None

    actual = triton_quant.w8_linear(x, qweight, scales, bias)

    assert actual.shape == (rows, OUT_FEATURES) and actual.dtype == dtype
    assert_matches_reference(actual, x, packing.dequantize_w8(qweight.cpu(), scales.cpu()), bias)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 17])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_w4_linear_equals_dequantize_then_matmul(dtype: torch.dtype, rows: int, group_size: int) -> None:
    """Three groups per row; the zeros and the nibble order of packing.py's layout matter."""
    in_features = 3 * group_size
    qweight, scales, zeros = w4_weight(OUT_FEATURES, in_features, group_size, seed=group_size + rows)
    x = random(rows, in_features, seed=300 + rows, dtype=dtype).to(DEVICE)
    bias = random(OUT_FEATURES, seed=400, dtype=dtype).to(DEVICE) if rows % 2 else None

    actual = triton_quant.w4_linear(x, qweight, scales, zeros, group_size, bias)

    assert actual.shape == (rows, OUT_FEATURES) and actual.dtype == dtype
    weight = packing.dequantize_w4(qweight.cpu(), scales.cpu(), zeros.cpu(), group_size)
    assert_matches_reference(actual, x, weight, bias)


@pytest.mark.parametrize(("dtype", "magic"), [(torch.bfloat16, 0x4300), (torch.float16, 0x6400)])
def test_w4_codes_minus_zeros_by_bit_tricks_are_exact(dtype: torch.dtype, magic: int) -> None:
    """The identity `_small_integers` relies on for 16-bit x, checked in torch for every code
    and zero: (magic | q) - (magic | z) read as `dtype` is exactly q - z. The interpreter
    runs that branch for float16 only (it cannot do bfloat16 arithmetic), so this is what
    covers the bfloat16 constant off a GPU."""
    codes = torch.arange(16, dtype=torch.int16)
    biased = (codes | magic).view(dtype)
    differences = biased[:, None] - biased[None, :]
    assert torch.equal(differences.float(), (codes[:, None] - codes[None, :]).float())


def test_w4_group_size_that_is_not_a_power_of_two() -> None:
    """The format allows any even group size: 48 columns load as 24 + 24, padded to 32."""
    qweight, scales, zeros = w4_weight(OUT_FEATURES, 144, 48, seed=5)
    x = random(2, 144, seed=6).to(DEVICE)
    weight = packing.dequantize_w4(qweight.cpu(), scales.cpu(), zeros.cpu(), 48)
    assert_matches_reference(triton_quant.w4_linear(x, qweight, scales, zeros, 48), x, weight, None)


SPLIT_CONFIGS = [
    pytest.param(TileConfig(16, 16, 32, 3, 4, 2), id="decode-tiles"),
    pytest.param(TileConfig(32, 32, 32, 2, 4, 2), id="prefill-tiles"),
]


@pytest.mark.parametrize("config", SPLIT_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_partial_sums_add_up_to_the_same_result(config: TileConfig, dtype: torch.dtype) -> None:
    """K cut across programs (5 w4 groups into 3 + 2 or 2 + 2 + 1; 5 w8 tiles likewise), their
    float32 partials summed, biased and rounded by the second kernel."""
    rows = 17 if config.block_m > 16 else 3
    x = random(rows, 160, seed=7, dtype=dtype).to(DEVICE)
    bias = random(OUT_FEATURES, seed=8, dtype=dtype).to(DEVICE)
    qweight, scales = w8_weight(OUT_FEATURES, 160, seed=9)
    actual = triton_quant.w8_linear(x, qweight, scales, bias, config=config)
    assert_matches_reference(actual, x, packing.dequantize_w8(qweight.cpu(), scales.cpu()), bias)

    qweight, scales, zeros = w4_weight(OUT_FEATURES, 160, 32, seed=10)
    actual = triton_quant.w4_linear(x, qweight, scales, zeros, 32, bias, config=config)
    weight = packing.dequantize_w4(qweight.cpu(), scales.cpu(), zeros.cpu(), 32)
    assert_matches_reference(actual, x, weight, bias)


@pytest.mark.parametrize("rows", [1, 17])
def test_mixed_precision_layer_writes_each_part_to_its_own_columns(rows: int) -> None:
    """MixLLM: 6 salient channels in w8, the other 31 in w4, both written through `out_rows`
    into one output, equal to the layer's full dequantized weight (in original channel order)
    applied at once. The w8 part splits K, so the reduction's scatter is covered too."""
    in_features, group_size = 128, 32
    salient = torch.tensor([36, 0, 17, 5, 22, 9])
    rest = torch.tensor([channel for channel in range(OUT_FEATURES) if channel not in set(salient.tolist())])
    weight = random(OUT_FEATURES, in_features, seed=11)
    bias = random(OUT_FEATURES, seed=12)
    q8, s8 = packing.quantize_w8(weight[salient])
    q4, s4, z4 = packing.quantize_w4(weight[rest], group_size)
    expected_weight = torch.empty_like(weight)
    expected_weight[salient] = packing.dequantize_w8(q8, s8)
    expected_weight[rest] = packing.dequantize_w4(q4, s4, z4, group_size)
    x = random(rows, in_features, seed=13, dtype=torch.bfloat16).to(DEVICE)
    out = torch.full((rows, OUT_FEATURES), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    to_device = lambda *tensors: [tensor.to(DEVICE) for tensor in tensors]  # noqa: E731

    returned = triton_quant.w8_linear(
        x, *to_device(q8, s8, bias[salient].bfloat16()), out=out, out_rows=salient.to(DEVICE),
        config=TileConfig(16 if rows == 1 else 32, 16, 32, 2, 4, 2),
    )
    triton_quant.w4_linear(x, *to_device(q4, s4, z4), group_size, bias[rest].bfloat16().to(DEVICE),
                           out=out, out_rows=rest.to(DEVICE))

    assert returned is out
    assert_matches_reference(out, x, expected_weight, bias.bfloat16())


def test_strided_x_rows_are_read_in_place() -> None:
    """A view of a wider activation (e.g. one part of a fused projection's output)."""
    wide = random(3, 200, seed=14).to(DEVICE)
    x = wide[:, 50:146]
    qweight, scales = w8_weight(OUT_FEATURES, 96, seed=15)
    actual = triton_quant.w8_linear(x, qweight, scales)
    assert_matches_reference(actual, x, packing.dequantize_w8(qweight.cpu(), scales.cpu()), None)


def test_choose_config_splits_k_only_when_output_tiles_are_too_few() -> None:
    cpu = torch.device("cpu")  # assumes an H100's 132 SMs
    decode_small = triton_quant.choose_config(1, 896, 896, torch.bfloat16, cpu, 128)  # Qwen2.5-0.5B o_proj
    assert (decode_small.block_m, decode_small.block_n, decode_small.split_k) == (16, 32, 3)
    decode_wide = triton_quant.choose_config(1, 28672, 4096, torch.bfloat16, cpu)  # Llama-3-8B gate_up
    assert decode_wide.block_n == 64 and decode_wide.split_k == 1
    prefill = triton_quant.choose_config(4096, 4096, 4096, torch.bfloat16, cpu, 128)
    assert (prefill.block_m, prefill.block_n, prefill.split_k, prefill.num_stages) == (128, 128, 1, 2)
    short_prefill = triton_quant.choose_config(17, 4096, 4096, torch.bfloat16, cpu)
    assert short_prefill.block_m == 32 and short_prefill.split_k > 1


def test_empty_batch_launches_nothing() -> None:
    qweight, scales = w8_weight(OUT_FEATURES, 64, seed=16)
    x = torch.empty((0, 64), device=DEVICE)
    assert triton_quant.w8_linear(x, qweight, scales).shape == (0, OUT_FEATURES)


def test_bad_inputs_get_a_clear_error() -> None:
    qweight, scales = w8_weight(OUT_FEATURES, 64, seed=17)
    x = random(2, 64, seed=18).to(DEVICE)
    with pytest.raises(ValueError, match="qweight must be int8"):
        triton_quant.w8_linear(x, qweight.to(torch.int16), scales)
    with pytest.raises(ValueError, match="scales must be float32"):
        triton_quant.w8_linear(x, qweight, scales.half())
    with pytest.raises(ValueError, match="out_rows needs the output tensor"):
        triton_quant.w8_linear(x, qweight, scales, out_rows=torch.arange(OUT_FEATURES, device=DEVICE))
    with pytest.raises(ValueError, match="every tensor must be on x's device"):
        triton_quant.w8_linear(x, qweight, scales.to("meta"))
    with pytest.raises(ValueError, match=r"out must be torch.float32 \[2, 37\]"):
        triton_quant.w8_linear(x, qweight, scales, out=torch.empty((2, 40), device=DEVICE))
    q4, s4, z4 = w4_weight(OUT_FEATURES, 64, 32, seed=19)
    with pytest.raises(ValueError, match="does not divide"):
        triton_quant.w4_linear(x, q4, s4, z4, 48)
    with pytest.raises(ValueError, match="zeros must be uint8"):
        triton_quant.w4_linear(x, q4, s4, z4.to(torch.int32), 32)
    with pytest.raises(ValueError, match="power of two"):
        TileConfig(16, 24, 32, 1, 4, 2)

"""QuantLinear (cpu_quant_linear.h) against fitserve.quant.packing's dequantize + a float matmul.

Tolerances, per output y[m, n]:
- dequantizing path (many rows, or isa="reference"): the same float32 matmul as
  F.linear(x, dequantize(...), bias); bit-identical for a layer of one part, float32 rounding
  (rtol 1e-6 of |x|.|w|) for parts scattered by out_rows.
- integer kernels (few rows): x is rounded to int8 per block of columns b (the w4 group, or 128
  columns for w8) with scale xs_b = max|x_b| / 127, and everything after that is exact integer
  arithmetic plus float32 sums. So (1) the kernel equals a float64 matmul of the rounded x with
  the dequantized weight within 1e-5 of |x|.|w|, and (2) against the float32 reference its
  error is at most sum_k |w[n, k]| * xs_b(k) / 2 (+ the same 1e-5 of |x|.|w|): the activation
  rounding and nothing else.
bf16 x: the float32 result rounded once to bf16 (one bf16 ulp more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitserve.kernels import cpu
from fitserve.quant import packing

kernels = cpu.get()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2 or no compiler)")

HAS_AMX = kernels is not None and kernels.has_amx_int8()
KERNEL_ISAS = [] if kernels is None else (["avx512_vnni", "avx2"] if kernels.has_avx512_vnni() else ["avx2"])
KERNEL_ISAS = ["amx", *KERNEL_ISAS] if HAS_AMX else KERNEL_ISAS
ALL_ISAS = [*KERNEL_ISAS, "reference"]
LANES_ISAS = ("amx", "avx512_vnni")  # the isas that hold parts in the lanes layouts
NATIVE_BF16 = kernels is not None and kernels.has_avx512_bf16()
W8_X_BLOCK = 128


def rounded_activations(x: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x as the kernels see it after rounding to int8 per block of columns (float32 arithmetic
    as in quantize_block), and each element's block scale xs."""
    rows, columns = x.shape
    padded = F.pad(x.float(), (0, -columns % block))
    blocks = padded.view(rows, -1, block)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    # A float32 division, as the kernels' 127.0f / amax (a scalar divided by a tensor may be
    # computed through a reciprocal, one rounding more, and move ties of x * inverse).
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(blocks * inverse).clamp(-127, 127)
    scale = (amax / 127.0).expand_as(blocks)
    return (codes * scale).reshape(rows, -1)[:, :columns], scale.reshape(rows, -1)[:, :columns]


def check_kernel_output(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        block: int) -> None:
    """Both bounds of the module docstring for an integer-kernel result."""
    x_rounded, scales = rounded_activations(x, block)
    bias64 = None if bias is None else bias.double()
    magnitude = x.abs().double() @ weight.abs().double().t()
    slack = 1e-5 * magnitude + 1e-6
    if out.dtype == torch.bfloat16:  # one rounding of the float32 result: at most one bf16 ulp
        slack = slack + 2 ** -7 * out.float().abs().double()
    emulated = F.linear(x_rounded.double(), weight.double(), bias64)
    assert ((out.double() - emulated).abs() <= slack).all(), (out.double() - emulated).abs().max()
    reference = F.linear(x.float(), weight, None if bias is None else bias.float()).double()
    bound = 0.5 * scales.double() @ weight.abs().double().t() * (1 + 1e-3) + slack
    assert ((out.double() - reference).abs() <= bound).all()
    # The bound is not vacuous: the rounding error is a visible fraction of it.
    assert (out.double() - reference).abs().max() > 1e-3 * bound.max()


def w4_layer(K: int, N: int, G: int, isa: str, bias: torch.Tensor | None, seed: int, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(N, K, generator=generator)
    qweight, scales, zeros = packing.quantize_w4(weight, G)
    layer = kernels.QuantLinear(K, N, bias, isa, **kwargs)
    layer.add_w4(qweight, scales, zeros, G)
    return layer, packing.dequantize_w4(qweight, scales, zeros, G)


def w8_layer(K: int, N: int, isa: str, bias: torch.Tensor | None, seed: int, **kwargs):
    generator = torch.Generator().manual_seed(seed)
    qweight, scales = packing.quantize_w8(torch.randn(N, K, generator=generator))
    layer = kernels.QuantLinear(K, N, bias, isa, **kwargs)
    layer.add_w8(qweight, scales)
    return layer, packing.dequantize_w8(qweight, scales)


def run_and_check(layer, weight, bias, x, block):
    out = layer.forward(x)
    assert out.dtype == x.dtype and out.shape == (x.shape[0], weight.shape[0])
    uses_kernel = layer.part_isas() != ["reference"] and x.shape[0] <= layer.decode_max_rows
    if uses_kernel:
        check_kernel_output(out, x, weight, bias, block)
    elif x.dtype == torch.float32:
        assert torch.equal(out, F.linear(x, weight, bias))
    elif NATIVE_BF16 and x.shape[0] > layer.decode_max_rows:  # the bf16 matmul on bf16 weights
        assert torch.equal(out, F.linear(x, weight.to(torch.bfloat16), None if bias is None else bias.bfloat16()))
    else:
        expected = F.linear(x.float(), weight, None if bias is None else bias.float()).to(torch.bfloat16)
        assert torch.equal(out, expected)


# K = 96 and 160 (G = 32) and 192 (G = 64) are not multiples of 64 or 128: the last chunk of
# codes is partial. 37 output rows: not a multiple of any blocking. G = 512 spans 8 chunks of
# 64 codes on AVX2, whose int16 pair sums are widened every 4.
W4_SHAPES = [(32, 96), (32, 160), (64, 192), (64, 896), (128, 384), (128, 896), (256, 768), (512, 1024)]


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize(("group_size", "in_features"), W4_SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 64, 300])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_w4_matches_dequantized_reference(isa, group_size, in_features, rows, x_dtype):
    bias = torch.randn(37, generator=torch.Generator().manual_seed(rows))
    layer, weight = w4_layer(in_features, 37, group_size, isa, bias, seed=in_features + rows)
    # AMX tiles take 64 columns of a group at a time; other groups stay on the VNNI kernel.
    assert layer.part_isas() == ["avx512_vnni" if isa == "amx" and group_size % 64 else isa]
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows + 1)).to(x_dtype)
    run_and_check(layer, weight, bias, x, group_size)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("group_size", [64, 128, 256, 512])
def test_w4_largest_products_stay_exact(isa, group_size):
    # Every code 15 against every x code +127 (or -127): the largest partial sums the kernels
    # form. A sum kept in int16 past 4 chunks of 64 codes would wrap (8 x 7620 > 32767).
    in_features = 2 * group_size
    weight = torch.full((20, in_features), 0.5)
    qweight, scales, zeros = packing.quantize_w4(weight, group_size)
    assert (packing.unpack_w4(qweight, group_size) == 15).all() and (zeros == 0).all()
    layer = kernels.QuantLinear(in_features, 20, None, isa)
    layer.add_w4(qweight, scales, zeros, group_size)
    dequantized = packing.dequantize_w4(qweight, scales, zeros, group_size)
    for sign, rows in [(1.0, 2), (-1.0, 2), (1.0, 17), (-1.0, 17)]:  # 17: AMX tiles where present
        x = torch.full((rows, in_features), sign)
        out = layer.forward(x)
        assert torch.allclose(out, F.linear(x, dequantized), rtol=1e-6), (out[0, 0], sign * in_features * 0.5)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize(("group_size", "in_features"), [(128, 384), (64, 576), (64, 1024)])
def test_w4_reads_nothing_past_the_parts_scales_and_zeros(isa, group_size, in_features):
    # The kernels read a row's group scales and zeros 8 at a time where that stays inside the
    # part (3, 9 and 16 groups per row here). Scales and zeros at the start of larger buffers
    # whose rest is NaN / 255: a read past the part's last row would reach the output.
    rows_of_w, groups = 37, in_features // group_size
    generator = torch.Generator().manual_seed(group_size + in_features)
    qweight, scales, zeros = packing.quantize_w4(torch.randn(rows_of_w, in_features, generator=generator), group_size)
    scale_buffer = torch.full((rows_of_w * groups + 64,), float("nan"), dtype=torch.float16)
    zero_buffer = torch.full((rows_of_w * groups + 64,), 255, dtype=torch.uint8)
    scale_buffer[:rows_of_w * groups] = scales.flatten()
    zero_buffer[:rows_of_w * groups] = zeros.flatten()
    layer = kernels.QuantLinear(in_features, rows_of_w, None, isa)
    layer.add_w4(qweight, scale_buffer[:rows_of_w * groups].view(rows_of_w, groups),
                 zero_buffer[:rows_of_w * groups].view(rows_of_w, groups), group_size)
    plain = kernels.QuantLinear(in_features, rows_of_w, None, isa)
    plain.add_w4(qweight.clone(), scales.clone(), zeros.clone(), group_size)
    for rows in (1, 2, 5, 17):
        x = torch.randn(rows, in_features, generator=generator)
        out = layer.forward(x)
        assert torch.isfinite(out).all() and torch.equal(out, plain.forward(x))


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("in_features", [100, 129, 896, 4864])
@pytest.mark.parametrize("rows", [1, 2, 3, 17, 64, 300])
def test_w8_matches_dequantized_reference(isa, in_features, rows):
    layer, weight = w8_layer(in_features, 37, isa, None, seed=in_features + rows)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows + 2))
    run_and_check(layer, weight, None, x, W8_X_BLOCK)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("rows", [9, 33, 64])
def test_integer_kernels_on_many_rows(isa, rows):
    # Past one tile of x rows (8 with VNNI, 4 with AVX2) and past the default row limit.
    bias = torch.randn(37)
    x = torch.randn(rows, 896)
    for layer, weight, block in [(*w4_layer(896, 37, 128, isa, bias, seed=1, decode_max_rows=1000), 128),
                                 (*w8_layer(896, 37, isa, bias, seed=2, decode_max_rows=1000), W8_X_BLOCK)]:
        check_kernel_output(layer.forward(x), x, weight, bias, block)


def mixed_rows(K: int, N: int, G: int, num_high: int, generator: torch.Generator):
    """A MixLLM layer's rows: random weights and bias, `num_high` salient rows (in w8) at random
    positions, the rest in w4 with group G; returns weight, bias, high, low, (q8, s8), (q4, s4, z4)."""
    weight = torch.randn(N, K, generator=generator)
    bias = torch.randn(N, generator=generator)
    order = torch.randperm(N, generator=generator)
    high, low = order[:num_high].sort().values, order[num_high:]
    return weight, bias, high, low, packing.quantize_w8(weight[high]), packing.quantize_w4(weight[low], G)


@pytest.mark.parametrize("isa", ALL_ISAS)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 9, 33, 300])
def test_mixed_parts_write_their_rows(isa, x_dtype, rows):
    # A MixLLM layer: most rows in w4, the salient ones in w8, each at its original position.
    K, N, G = 256, 41, 64
    generator = torch.Generator().manual_seed(rows)
    weight, bias, high, low, (q8, s8), (q4, s4, z4) = mixed_rows(K, N, G, 5, generator)
    layer = kernels.QuantLinear(K, N, bias, isa)
    layer.add_w4(q4, s4, z4, G, out_rows=low)
    layer.add_w8(q8, s8, out_rows=high)
    assert layer.part_layouts() == ["lanes" if isa in LANES_ISAS else "rows"] * 2
    dequantized = torch.empty(N, K)
    dequantized[low] = packing.dequantize_w4(q4, s4, z4, G)
    dequantized[high] = packing.dequantize_w8(q8, s8)
    x = torch.randn(rows, K, generator=generator).to(x_dtype)
    out = layer.forward(x)
    assert out.dtype == x_dtype
    if isa == "reference" or rows > layer.decode_max_rows:
        expected = F.linear(x.float(), dequantized, bias)
        tolerance = 1e-6 * (x.float().abs() @ dequantized.abs().t()) + 1e-6
        if x_dtype == torch.bfloat16:  # bf16 weights (native bf16 CPUs) and a bf16 result
            tolerance = tolerance + 2 ** -8 * (x.float().abs() @ dequantized.abs().t() + expected.abs())
        assert ((out.float() - expected).abs() <= tolerance).all()
    else:
        check_kernel_output(out[:, low], x, dequantized[low], bias[low], G)
        check_kernel_output(out[:, high], x, dequantized[high], bias[high], W8_X_BLOCK)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("rows", [1, 9, 33])
def test_a_mixed_layer_computes_each_part_as_a_layer_of_its_own(isa, rows):
    # With group 128 MixLLM's w4 rows and w8 rows round x in the same 128-column blocks, and the
    # lanes kernels share one quantized x between the parts: each part's outputs must still be
    # exactly those of a layer holding that part alone.
    K, N, G = 384, 45, 128
    generator = torch.Generator().manual_seed(rows)
    _, bias, high, low, (q8, s8), (q4, s4, z4) = mixed_rows(K, N, G, 7, generator)
    mixed = kernels.QuantLinear(K, N, bias, isa)
    mixed.add_w4(q4.clone(), s4.clone(), z4.clone(), G, out_rows=low)
    mixed.add_w8(q8.clone(), s8.clone(), out_rows=high)
    w4_alone = kernels.QuantLinear(K, len(low), bias[low].clone(), isa)
    w4_alone.add_w4(q4.clone(), s4.clone(), z4.clone(), G)
    w8_alone = kernels.QuantLinear(K, len(high), bias[high].clone(), isa)
    w8_alone.add_w8(q8.clone(), s8.clone())
    for x_dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(rows, K, generator=generator).to(x_dtype)
        out = mixed.forward(x)
        assert torch.equal(out[:, low], w4_alone.forward(x))
        assert torch.equal(out[:, high], w8_alone.forward(x))


def test_unsupported_group_size_runs_the_dequantizing_path():
    # G = 6 is no multiple of 8 (lanes layout) nor of 32 (row layout): no kernel fits, the part says so.
    layer, weight = w4_layer(96, 37, 6, "auto", None, seed=3)
    assert layer.part_isas() == ["reference"] and layer.part_layouts() == ["rows"]
    x = torch.randn(2, 96)
    assert torch.equal(layer.forward(x), F.linear(x, weight))


LANES = pytest.mark.skipif(kernels is None or not kernels.has_avx512_vnni(), reason="the lanes layout is AVX-512 VNNI's")
LANE_ROWS_OF_X = [1, 2, 7, 8, 9, 31, 32, 33, 64, 65]


@LANES
@pytest.mark.parametrize("isa", [isa for isa in KERNEL_ISAS if isa in LANES_ISAS])
@pytest.mark.parametrize(("out_features", "in_features", "group_size"),
                         [(16, 128, 128), (37, 896, 128), (33, 96, 32), (1, 64, 64), (50, 48, 48), (7, 24, 8)])
def test_lanes_layout_is_packings_and_its_kernel_matches_the_reference(isa, out_features, in_features, group_size):
    # N not a multiple of 16 (a short last block), one row, groups the row layout cannot run (48, 8).
    generator = torch.Generator().manual_seed(out_features + in_features)
    qweight, scales, zeros = packing.quantize_w4(torch.randn(out_features, in_features, generator=generator),
                                                 group_size)
    bias = torch.randn(out_features, generator=generator)
    layer = kernels.QuantLinear(in_features, out_features, bias, isa, decode_max_rows=1000)
    held = layer.add_w4(qweight, scales, zeros, group_size)
    assert layer.part_layouts() == ["lanes"]
    assert layer.part_isas() == ["amx" if isa == "amx" and group_size % 64 == 0 else "avx512_vnni"]
    lanes = packing.pack_w4_lanes(qweight, scales, zeros, group_size)
    assert all(torch.equal(a, b) for a, b in zip(held, lanes, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(packing.unpack_w4_lanes(*lanes, group_size),
                                                 (qweight, scales, zeros), strict=True))
    assert held[0].data_ptr() != qweight.data_ptr() and layer.bytes() == sum(
        t.numel() * t.element_size() for t in (qweight, scales, zeros, bias))
    weight = packing.dequantize_w4(qweight, scales, zeros, group_size)
    for rows in LANE_ROWS_OF_X:
        x = torch.randn(rows, in_features, generator=generator)
        check_kernel_output(layer.forward(x), x, weight, bias, group_size)
    # The tensors it returned, given back as lanes, run the same; given to a CPU path without the
    # layout (reference isa), they are converted back to the row layout.
    x = torch.randn(5, in_features, generator=generator)
    again = kernels.QuantLinear(in_features, out_features, bias, isa, decode_max_rows=1000)
    assert again.add_w4(*held, group_size, layout="lanes")[0].data_ptr() == held[0].data_ptr()
    assert torch.equal(again.forward(x), layer.forward(x))
    reference = kernels.QuantLinear(in_features, out_features, bias, "reference")
    assert torch.equal(reference.add_w4(*held, group_size, layout="lanes")[0], qweight)
    assert torch.equal(reference.forward(x), F.linear(x, weight, bias))


@LANES
@pytest.mark.parametrize("isa", [isa for isa in KERNEL_ISAS if isa in LANES_ISAS])
@pytest.mark.parametrize(("out_features", "in_features"),
                         [(16, 128), (37, 100), (1, 4), (50, 132), (33, 4864), (37, 192)])
def test_w8_lanes_layout_is_packings_and_its_kernel_matches_the_reference(isa, out_features, in_features):
    # A short last block of rows, one row, K % 8 == 4 (an odd step in the last block of x), K not a
    # multiple of 128 (a short last block of x), down_proj's K, and on AMX a last block of x that
    # is one 64-column tile (192) with a short last block of rows.
    generator = torch.Generator().manual_seed(out_features + in_features)
    qweight, scales = packing.quantize_w8(torch.randn(out_features, in_features, generator=generator))
    bias = torch.randn(out_features, generator=generator)
    layer = kernels.QuantLinear(in_features, out_features, bias, isa, decode_max_rows=1000)
    held = layer.add_w8(qweight, scales)
    assert layer.part_layouts() == ["lanes"]
    assert layer.part_isas() == ["amx" if isa == "amx" and in_features % 64 == 0 else "avx512_vnni"]
    lanes = packing.pack_w8_lanes(qweight)
    assert torch.equal(held[0], lanes) and torch.equal(held[1], scales)
    assert torch.equal(packing.unpack_w8_lanes(lanes), qweight)
    assert held[0].data_ptr() != qweight.data_ptr() and layer.bytes() == sum(
        t.numel() * t.element_size() for t in (qweight, scales, bias))
    weight = packing.dequantize_w8(qweight, scales)
    for rows in LANE_ROWS_OF_X:
        x = torch.randn(rows, in_features, generator=generator)
        check_kernel_output(layer.forward(x), x, weight, bias, W8_X_BLOCK)
    x = torch.randn(5, in_features, generator=generator)
    again = kernels.QuantLinear(in_features, out_features, bias, isa, decode_max_rows=1000)
    assert again.add_w8(*held, layout="lanes")[0].data_ptr() == held[0].data_ptr()
    assert torch.equal(again.forward(x), layer.forward(x))
    reference = kernels.QuantLinear(in_features, out_features, bias, "reference")
    assert torch.equal(reference.add_w8(*held, layout="lanes")[0], qweight)
    assert torch.equal(reference.forward(x), F.linear(x, weight, bias))


@LANES
def test_in_place_repacks_the_given_tensors():
    # in_place: the caller's (contiguous) tensors are rewritten in the other layout and held.
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(37, 256, generator=generator)
    w4 = packing.quantize_w4(weight, 64)
    w8 = packing.quantize_w8(weight)
    given4, given8 = [t.clone() for t in w4], [t.clone() for t in w8]
    layer = kernels.QuantLinear(256, 37, None, "avx512_vnni", decode_max_rows=1000)
    held4 = layer.add_w4(*given4, 64, in_place=True)
    assert [t.data_ptr() for t in held4] == [t.data_ptr() for t in given4]
    assert all(torch.equal(a, b) for a, b in zip(given4, packing.pack_w4_lanes(*w4, 64), strict=True))
    w8_layer_ = kernels.QuantLinear(256, 37, None, "avx512_vnni", decode_max_rows=1000)
    held8 = w8_layer_.add_w8(*given8, in_place=True)
    assert held8[0].data_ptr() == given8[0].data_ptr() and torch.equal(given8[0], packing.pack_w8_lanes(w8[0]))
    x = torch.randn(3, 256, generator=generator)
    check_kernel_output(layer.forward(x), x, packing.dequantize_w4(*w4, 64), None, 64)
    check_kernel_output(w8_layer_.forward(x), x, packing.dequantize_w8(*w8), None, W8_X_BLOCK)
    # And back: lanes tensors given to a CPU path without the layout return to the row layout.
    reference = kernels.QuantLinear(256, 37, None, "reference")
    assert reference.add_w8(*held8, layout="lanes", in_place=True)[0].data_ptr() == given8[0].data_ptr()
    assert torch.equal(given8[0], w8[0])


@LANES
def test_w8_without_whole_4_column_steps_keeps_the_row_layout():
    layer, weight = w8_layer(129, 20, "avx512_vnni", None, seed=3)
    assert layer.part_layouts() == ["rows"] and layer.decode_max_rows == 64
    x = torch.randn(3, 129)
    check_kernel_output(layer.forward(x), x, weight, None, W8_X_BLOCK)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        kernels.QuantLinear(129, 20).add_w8(*packing.quantize_w8(torch.randn(20, 129)), layout="lanes")


@LANES
def test_layers_with_a_lanes_part_run_the_kernel_for_more_rows_by_default():
    # The lanes kernels beat dequantize-and-matmul far beyond the row kernels' 64 rows.
    w8_rows, _ = w8_layer(256, 20, "auto", None, seed=5, lanes=False)
    assert w8_rows.decode_max_rows == 64
    w8_lanes, w8_weight = w8_layer(256, 20, "auto", None, seed=5)
    assert w8_lanes.decode_max_rows == 256
    x = torch.randn(200, 256)
    check_kernel_output(w8_lanes.forward(x), x, w8_weight, None, W8_X_BLOCK)
    layer, weight = w4_layer(256, 20, 64, "auto", None, seed=5)
    assert layer.decode_max_rows == 256
    x = torch.randn(200, 256)
    check_kernel_output(layer.forward(x), x, weight, None, 64)  # rounded activations: the kernel ran
    assert torch.equal(layer.forward(torch.randn(257, 256)[:0]), torch.empty(0, 20))
    with pytest.raises(RuntimeError, match="decode_max_rows must be"):
        kernels.QuantLinear(256, 20, None, "auto", -2)


@LANES
@pytest.mark.parametrize("fmt", ["w4", "w8"])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "in_features"), [(65, 896), (300, 896), (65, 100)])
def test_dequantizing_path_reads_the_lanes_layout(fmt, x_dtype, rows, in_features):
    # Many rows: the lanes-layout part is dequantized (a short last block of 37 % 16 rows; w8 with
    # K = 100, not a multiple of 16 columns: a partial last transpose).
    bias = torch.randn(37)
    if fmt == "w4":
        layer, weight = w4_layer(in_features, 37, 4 if in_features == 100 else 128, "avx512_vnni", bias, seed=rows,
                                 decode_max_rows=64)
    else:
        layer, weight = w8_layer(in_features, 37, "avx512_vnni", bias, seed=rows, decode_max_rows=64)
    assert layer.part_layouts() == (["lanes"] if fmt == "w8" or in_features % 8 == 0 else ["rows"])
    x = torch.randn(rows, in_features).to(x_dtype)
    run_and_check(layer, weight, bias, x, 128)


@LANES
@pytest.mark.parametrize("rows", LANE_ROWS_OF_X)
def test_lanes_and_row_layouts_agree_within_the_bound(rows):
    # The row-major kernels stay reachable (lanes=False) and both layouts meet the same bound.
    x = torch.randn(rows, 256)
    for lanes in (True, False):
        layer, weight = w4_layer(256, 41, 64, "avx512_vnni", None, seed=rows, decode_max_rows=1000, lanes=lanes)
        assert layer.part_layouts() == ["lanes" if lanes else "rows"]
        check_kernel_output(layer.forward(x), x, weight, None, 64)
        layer, weight = w8_layer(256, 41, "avx512_vnni", None, seed=rows, decode_max_rows=1000, lanes=lanes)
        assert layer.part_layouts() == ["lanes" if lanes else "rows"]
        check_kernel_output(layer.forward(x), x, weight, None, W8_X_BLOCK)


@pytest.mark.parametrize("fmt", ["w4", "w8"])
@pytest.mark.parametrize("lanes", [True, False])
def test_scalar_dequantizing_loops_match_the_vector_ones(fmt, lanes):
    # CPUs without AVX-512 (or without its BF16 rounding, for bf16 slices) dequantize in scalar
    # loops; forced here, they must give the vector loops' values bit for bit.
    bias = torch.randn(37)
    if fmt == "w4":
        layer, _ = w4_layer(896, 37, 128, "auto", bias, seed=11, decode_max_rows=4, lanes=lanes)
    else:
        layer, _ = w8_layer(896, 37, "auto", bias, seed=11, decode_max_rows=4, lanes=lanes)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(65, 896).to(dtype)
        vector = layer.forward(x)
        kernels.set_scalar_dequantize(True)
        try:
            scalar = layer.forward(x)
        finally:
            kernels.set_scalar_dequantize(False)
        assert torch.equal(scalar, vector)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("rows", [1, 9, 17, 64])
def test_bf16_decode_rows_are_the_float32_results_rounded_once(isa, rows):
    # bf16 x on the integer kernels is widened exactly and the float32 results are rounded to
    # nearest even, as .to(torch.bfloat16) rounds them (the lanes kernels round as they store,
    # to the layer's rows in order or, in a mixed layer, scattered to each part's rows; 41 rows
    # end in a short block; 17 rows run on AMX tiles where the CPU has them).
    x = torch.randn(rows, 256).bfloat16()
    _, bias, high, low, (q8, s8), (q4, s4, z4) = mixed_rows(256, 41, 64, 5, torch.Generator().manual_seed(rows))
    layers = []
    for layer_bias in (torch.randn(41), None):
        layers += [w4_layer(256, 41, 64, isa, layer_bias, seed=rows)[0], w8_layer(256, 41, isa, layer_bias, seed=rows)[0]]
        mixed = kernels.QuantLinear(256, 41, layer_bias, isa)
        mixed.add_w4(q4, s4, z4, 64, out_rows=low)
        mixed.add_w8(q8, s8, out_rows=high)
        layers.append(mixed)
    for layer in layers:
        out = layer.forward(x)
        assert out.dtype == torch.bfloat16 and torch.equal(out, layer.forward(x.float()).bfloat16())


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_forward_into_writes_a_bf16_decode_step_into_the_given_buffer(isa):
    # The fused decode stack hands each projection its buffer of the step; anything that does
    # not fit it (shape, dtype, x itself) gets a fresh tensor, and the values never change.
    layer, _ = w4_layer(256, 41, 64, isa, torch.randn(41), seed=7)
    x = torch.randn(3, 256).bfloat16()
    expected = layer.forward(x)
    buffer = torch.full((3, 41), float("nan"), dtype=torch.bfloat16)
    out = layer.forward_into(x, buffer)
    assert torch.equal(out, expected)
    if layer.part_layouts() == ["lanes"]:  # the lanes kernels store bf16 results themselves
        assert out.data_ptr() == buffer.data_ptr()
    for unfit in (torch.empty(2, 41, dtype=torch.bfloat16), torch.empty(3, 41), torch.empty(41, 3, dtype=torch.bfloat16).t()):
        result = layer.forward_into(x, unfit)
        assert torch.equal(result, expected) and result.data_ptr() != unfit.data_ptr()
    square, _ = w4_layer(256, 256, 64, isa, None, seed=8)
    x_square = torch.randn(2, 256).bfloat16()
    x_before = x_square.clone()
    expected = square.forward(x_square)
    assert torch.equal(square.forward_into(x_square, x_square), expected)  # never into x itself
    assert torch.equal(x_square, x_before)
    assert torch.equal(layer.forward_into(x.float(), buffer), layer.forward(x.float()))


def test_results_do_not_depend_on_thread_count():
    layer, _ = w4_layer(896, 301, 128, "auto", None, seed=4)
    x = torch.randn(3, 896)
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = layer.forward(x)
        for threads in (3, 12):  # 12: more threads than the work-stealing ranges keep on the stack
            torch.set_num_threads(threads)
            assert torch.equal(layer.forward(x), alone)
            row = x[:1].bfloat16()
            assert torch.equal(layer.forward(row), layer.forward(row.float()).bfloat16())
    finally:
        torch.set_num_threads(saved)


def test_bytes_counts_every_stored_tensor():
    K, N, G = 256, 10, 64
    weight = torch.randn(N, K)
    q4, s4, z4 = packing.quantize_w4(weight[:7], G)
    q8, s8 = packing.quantize_w8(weight[7:])
    layer = kernels.QuantLinear(K, N, torch.zeros(N))
    layer.add_w4(q4, s4, z4, G)
    rows = torch.tensor([7, 8, 9])
    layer.add_w8(q8, s8, out_rows=rows)
    expected = sum(t.numel() * t.element_size() for t in (q4, s4, z4, q8, s8, rows)) + 4 * N
    assert layer.bytes() == expected
    assert (layer.in_features, layer.out_features) == (K, N)


def test_bad_input_is_refused_with_a_message():
    q4, s4, z4 = packing.quantize_w4(torch.randn(4, 128), 64)
    with pytest.raises(RuntimeError, match="isa must be"):
        kernels.QuantLinear(128, 4, None, "sse9")
    with pytest.raises(RuntimeError, match="group size 48"):
        kernels.QuantLinear(128, 4).add_w4(q4, s4, z4, 48)
    with pytest.raises(RuntimeError, match="layout must be rows or lanes"):
        kernels.QuantLinear(128, 4).add_w4(q4, s4, z4, 64, layout="columns")
    with pytest.raises(RuntimeError, match="add_w8: layout must be rows or lanes"):
        kernels.QuantLinear(128, 4).add_w8(*packing.quantize_w8(torch.randn(4, 128)), layout="columns")
    with pytest.raises(RuntimeError, match="scales must be float16"):
        kernels.QuantLinear(128, 4).add_w4(q4, s4.float(), z4, 64)
    layer = kernels.QuantLinear(128, 8)
    layer.add_w4(q4, s4, z4, 64)
    with pytest.raises(RuntimeError, match="cover 4 of 8"):
        layer.forward(torch.randn(1, 128))
    with pytest.raises(RuntimeError, match="written by two parts"):
        layer.add_w4(q4, s4, z4, 64, out_rows=torch.tensor([3, 4, 5, 6]))
    with pytest.raises(RuntimeError, match="outside"):
        layer.add_w4(q4, s4, z4, 64, out_rows=torch.tensor([4, 5, 6, 8]))
    layer.add_w4(q4, s4, z4, 64, out_rows=torch.tensor([4, 5, 6, 7]))
    with pytest.raises(RuntimeError, match="x must be a contiguous CPU tensor"):
        layer.forward(torch.randn(1, 127))
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        layer.forward(torch.randn(1, 128).half())

"""BitStackLinear (cpu_bitstack_linear.h) against the layout's reference: dequantize_blocks +
F.linear (fitserve/quant/bitstack_packing.py).

Tolerances, per output y[m, n]:
- rebuilding path (many rows, or isa="reference"): W rebuilt in float32 and the matmul library,
  so float32 rounding only: within 1e-5 of Σ_k |x_k| |W_nk| (+1e-6).
- integer kernels (few rows; both the lane-per-rank kernel and, on AVX-512 VNNI, the
  columns-in-lanes kernel for small ranks round T the same way): per block and rank j,
  T[k, j] = v[j, k] x[k] is rounded to int8
  per block of 128 columns with scale t = max|T| / 127; the rest is exact integer sums and
  float32 arithmetic. So (1) the kernel equals a float64 evaluation of Σ_b u_b (S_b T_b) with
  the rounded T within 1e-5 of its magnitude Σ |u| |S| |T|, and (2) against the float32
  reference its error is at most Σ_b Σ_j |u_b[n, j]| Σ_k t_b(k, j) / 2: the rounding of T and
  nothing else.
bf16 x: the float32 result rounded once to bf16 (one bf16 ulp more).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitserve.kernels import cpu
from fitserve.quant import bitstack_packing as packing

kernels = cpu.get()
pytestmark = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2 or no compiler)")

KERNEL_ISAS = [] if kernels is None else (["avx512_vnni", "avx2"] if kernels.has_avx512_vnni() else ["avx2"])
# Decode kernels as (isa, small_rank_max): on AVX-512 VNNI the columns-in-lanes kernel forced for
# every rank (64) and never (0); AVX2 has the lane-per-rank kernel only.
KERNEL_PATHS = [] if kernels is None else (
    [("avx512_vnni", 64), ("avx512_vnni", 0), ("avx2", 64)] if kernels.has_avx512_vnni() else [("avx2", 64)])
PATH_IDS = [f"{isa}-small_rank_max{limit}" for isa, limit in KERNEL_PATHS]
COLUMNS = 128  # columns of T per int8 scale


def random_blocks(rows: int, columns: int, rank: int, blocks: int, seed: int):
    """`blocks` random blocks (signs, u, v) stacked on dim 0, like a checkpoint's tensors."""
    generator = torch.Generator().manual_seed(seed)
    negative = torch.rand(max(blocks, 1), rows, columns, generator=generator) < 0.5
    signs = packing.pack_signs(negative)[:blocks]
    u = (torch.randn(blocks, rows, rank, generator=generator) * 0.1).half()
    v = (torch.randn(blocks, rank, columns, generator=generator) * 0.1).half()
    return signs, u, v


def make_layer(parts, columns: int, bias: torch.Tensor | None, isa: str, **kwargs):
    """A BitStackLinear with one part per (signs, u, v) stack, in order."""
    rows = sum(signs.shape[1] for signs, _, _ in parts)
    layer = kernels.BitStackLinear(columns, rows, bias, isa, **kwargs)
    for signs, u, v in parts:
        index = layer.add_part(u.shape[1], u.shape[2])
        for block in range(signs.shape[0]):
            layer.append_block(index, signs[block], u[block], v[block])
    return layer


def dense_weight(parts, columns: int) -> torch.Tensor:
    return torch.cat([packing.dequantize_blocks(s, u, v, columns) if s.shape[0] else
                      torch.zeros(s.shape[1], columns) for s, u, v in parts])


def rounded_t(x_row: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T = v * x rounded as the kernels round it (float32 product, per-128-column scale, ties
    to even), and each element's scale t: both [r, K]."""
    products = v.float() * x_row.float()
    rank, columns = products.shape
    padded = F.pad(products, (0, -columns % COLUMNS)).view(rank, -1, COLUMNS)
    amax = padded.abs().amax(dim=-1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(padded * inverse).clamp(-127, 127)
    scale = (amax / 127.0).expand_as(padded)
    return (codes * scale).reshape(rank, -1)[:, :columns], scale.reshape(rank, -1)[:, :columns]


def check_kernel_output(out, x, parts, columns: int, bias) -> None:
    """Both bounds of the module docstring for an integer-kernel result."""
    emulated, magnitude, bound = [], [], []
    for m in range(x.shape[0]):
        rows_e, rows_m, rows_b = [], [], []
        for signs, u, v in parts:
            e = torch.zeros(u.shape[1], dtype=torch.float64)
            mag = torch.zeros_like(e)
            err = torch.zeros_like(e)
            for block in range(signs.shape[0]):
                t_rounded, scale = rounded_t(x[m], v[block])
                sign = packing.unpack_signs(signs[block], columns).double()
                st = sign @ t_rounded.double().t()          # [N, r]
                e += (u[block].double() * st).sum(-1)
                mag += (u[block].double().abs() * (sign.abs() @ t_rounded.double().abs().t())).sum(-1)
                err += 0.5 * (u[block].double().abs() * scale.double().sum(-1)).sum(-1)
            rows_e.append(e), rows_m.append(mag), rows_b.append(err)
        emulated.append(torch.cat(rows_e)), magnitude.append(torch.cat(rows_m)), bound.append(torch.cat(rows_b))
    emulated, magnitude, bound = torch.stack(emulated), torch.stack(magnitude), torch.stack(bound)
    if bias is not None:
        emulated = emulated + bias.double()
    slack = 1e-5 * magnitude + 1e-6
    if out.dtype == torch.bfloat16:
        slack = slack + 2 ** -7 * out.float().abs().double()
    assert ((out.double() - emulated).abs() <= slack).all(), (out.double() - emulated).abs().max()
    reference = F.linear(x.float(), dense_weight(parts, columns), None if bias is None else bias.float()).double()
    error = (out.double() - reference).abs()
    assert (error <= bound * (1 + 1e-3) + slack).all(), (error - bound).max()
    if bound.max() > 0:  # the bound is not vacuous: the rounding error is a visible fraction of it
        assert error.max() > 1e-3 * bound.max()


@pytest.mark.parametrize("isa", KERNEL_ISAS)
@pytest.mark.parametrize("shape", [
    # (rows, columns, rank, blocks, rows of x)
    (37, 100, 16, 3, 1),     # K not a multiple of 8 or 64, N not of 4
    (64, 896, 16, 3, 2),     # a Qwen2.5-0.5B width
    (5, 13, 1, 2, 3),        # rank 1, K < 16
    (33, 300, 20, 2, 1),     # rank above 16: two lane chunks
    (17, 257, 7, 1, 4),      # rank 7: idle lanes; K one past two scale blocks
    (3, 8, 16, 4, 1),        # a single packed byte per row
])
def test_kernel_matches_reference(isa, shape):
    rows, columns, rank, blocks, m = shape
    parts = [random_blocks(rows, columns, rank, blocks, seed=rows + columns)]
    bias = torch.randn(rows)
    layer = make_layer(parts, columns, bias, isa)
    x = torch.randn(m, columns)
    out = layer(x)
    assert out.shape == (m, rows) and out.dtype == torch.float32
    check_kernel_output(out, x, parts, columns, bias)


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_fused_parts_with_different_ranks_and_depths(isa):
    """A qkv-like layer: three parts of different rows, ranks and loaded depths, each writing its
    own rows; one part with no block loaded gives the bias alone."""
    columns = 200
    parts = [random_blocks(24, columns, 16, 3, 1), random_blocks(8, columns, 4, 1, 2),
             random_blocks(9, columns, 8, 0, 3)]
    bias = torch.randn(41)
    layer = make_layer(parts, columns, bias, isa)
    x = torch.randn(2, columns)
    out = layer(x)
    check_kernel_output(out, x, parts, columns, bias)
    assert torch.equal(out[:, 32:], bias[32:].expand(2, 9))


@pytest.mark.parametrize(("isa", "small_rank_max"), KERNEL_PATHS, ids=PATH_IDS)
@pytest.mark.parametrize("shape", [
    # (rows, columns, rank, blocks, rows of x): the ranks `--rank auto` picks, odd shapes
    (37, 100, 1, 3, 1),      # K not a multiple of 8, 64 or 128; N odd
    (64, 896, 1, 4, 1),      # a Qwen2.5-0.5B width, the w4-equal depth at rank 1
    (29, 257, 2, 2, 2),      # K one past two scale blocks
    (5, 13, 3, 5, 3),        # K < 16, rank 3: a pass of two ranks and one of one
    (11, 700, 4, 1, 8),      # rank 4: two passes, the most decode rows
    (18, 333, 5, 2, 7),      # rank 5: three passes, 7 rows of x
    (7, 1030, 8, 3, 2),      # rank 8; K past a 64-column step of the last group
    (6, 64, 1, 0, 2),        # no block loaded: the bias alone
])
def test_small_ranks_on_every_decode_kernel(isa, small_rank_max, shape):
    """Both decode kernels round T alike, so both meet the same bound at every small rank."""
    rows, columns, rank, blocks, m = shape
    parts = [random_blocks(rows, columns, rank, blocks, seed=3 * rows + columns)]
    bias = torch.randn(rows)
    layer = make_layer(parts, columns, bias, isa, small_rank_max=small_rank_max)
    expected = "small_rank" if isa == "avx512_vnni" and small_rank_max >= rank else "lanes_per_rank"
    assert layer.part_kernels() == [expected]
    x = torch.randn(m, columns)
    out = layer(x)
    check_kernel_output(out, x, parts, columns, bias)
    if blocks == 0:
        assert torch.equal(out, bias.expand(m, rows))


@pytest.mark.skipif(not KERNEL_PATHS or KERNEL_PATHS[0][0] != "avx512_vnni", reason="no AVX-512 VNNI")
def test_kernel_choice_per_part_by_rank():
    """A fused layer mixing ranks runs each part on its own kernel (the default crossover splits
    rank 1 from rank 16) and the parts agree with the reference together."""
    columns = 160
    parts = [random_blocks(12, columns, 1, 4, 21), random_blocks(10, columns, 16, 2, 22),
             random_blocks(5, columns, 3, 3, 23)]
    layer = make_layer(parts, columns, None, "avx512_vnni")
    assert layer.small_rank_max >= 3
    assert layer.part_kernels() == ["small_rank", "lanes_per_rank", "small_rank"]
    x = torch.randn(2, columns)
    check_kernel_output(layer(x), x, parts, columns, None)
    assert make_layer(parts, columns, None, "reference").part_kernels() == ["rebuild"] * 3


@pytest.mark.parametrize(("isa", "small_rank_max"), KERNEL_PATHS, ids=PATH_IDS)
def test_small_rank_resize(isa, small_rank_max):
    """Depths 0..n of a rank-1 stack equal a layer built with that many blocks, bit for bit."""
    columns = 200
    signs, u, v = random_blocks(13, columns, 1, 4, 24)
    x = torch.randn(1, columns)
    full = make_layer([(signs, u, v)], columns, None, isa, small_rank_max=small_rank_max)
    for depth in range(5):
        fresh = make_layer([(signs[:depth], u[:depth], v[:depth])], columns, None, isa, small_rank_max=small_rank_max)
        full.set_active_blocks(0, depth)
        assert torch.equal(full(x), fresh(x))


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_bfloat16_input(isa):
    parts = [random_blocks(40, 192, 16, 2, 5)]
    layer = make_layer(parts, 192, None, isa)
    x = torch.randn(3, 192).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    check_kernel_output(out, x.float(), parts, 192, None)


@pytest.mark.parametrize("isa", [*KERNEL_ISAS, "reference"])
@pytest.mark.parametrize("m", [1, 7])
def test_rebuilding_path_matches_reference(isa, m):
    """Above decode_max_rows (and always with isa='reference') W is rebuilt and multiplied by
    the library: float32 rounding only."""
    columns = 150
    parts = [random_blocks(21, columns, 16, 3, 7), random_blocks(6, columns, 3, 2, 8)]
    bias = torch.randn(27)
    layer = make_layer(parts, columns, bias, isa, decode_max_rows=0)
    x = torch.randn(m, columns)
    out = layer(x)
    weight = dense_weight(parts, columns)
    reference = F.linear(x, weight, bias)
    slack = 1e-5 * (x.abs() @ weight.abs().t()) + 1e-6
    assert ((out - reference).abs() <= slack).all()


def test_bfloat16_rebuilding_path():
    parts = [random_blocks(30, 96, 8, 2, 9)]
    layer = make_layer(parts, 96, None, "reference")
    x = torch.randn(70, 96).to(torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    reference = F.linear(x.float(), dense_weight(parts, 96))
    # bf16 x, and on bf16 CPUs a bf16 W, each rounded once (2^-8 relative) before float32 sums.
    slack = 2 ** -6 * (x.float().abs() @ dense_weight(parts, 96).abs().t()) + 2 ** -7 * reference.abs() + 1e-5
    assert ((out.float() - reference).abs() <= slack).all()


@pytest.mark.parametrize("isa", KERNEL_ISAS)
def test_resize_changes_only_the_depth(isa):
    """set_active_blocks and truncate give the layer of the first d blocks exactly (the same
    sums as a layer built with d blocks), and appending after truncating restores it."""
    columns = 130
    signs, u, v = random_blocks(19, columns, 16, 4, 11)
    x = torch.randn(1, columns)
    full = make_layer([(signs, u, v)], columns, None, isa)
    for depth in range(5):
        fresh = make_layer([(signs[:depth], u[:depth], v[:depth])], columns, None, isa)
        full.set_active_blocks(0, depth)
        assert full.active_blocks(0) == depth
        assert torch.equal(full(x), fresh(x))
    full.set_active_blocks(0, 4)
    before = full(x)
    full.truncate(0, 1)
    assert (full.stored_blocks(0), full.active_blocks(0)) == (1, 1)
    for block in range(1, 4):
        full.append_block(0, signs[block], u[block], v[block])
    assert full.active_blocks(0) == 4
    assert torch.equal(full(x), before)


def test_bytes_count_the_stored_blocks():
    signs, u, v = random_blocks(10, 40, 4, 3, 12)
    layer = make_layer([(signs, u, v)], 40, torch.zeros(10), "auto")
    per_block = packing.block_bytes(10, 40, 4)
    assert layer.bytes() == 3 * per_block + 10 * 4
    layer.truncate(0, 1)
    assert layer.bytes() == per_block + 10 * 4


def test_bad_input_is_refused_with_a_clear_message():
    signs, u, v = random_blocks(10, 40, 4, 1, 13)
    layer = kernels.BitStackLinear(40, 10, None, "auto")
    with pytest.raises(RuntimeError, match="the parts cover 0 of 10"):
        layer(torch.randn(1, 40))
    part = layer.add_part(10, 4)
    with pytest.raises(RuntimeError, match="parts would cover"):
        layer.add_part(1, 4)
    with pytest.raises(RuntimeError, match="u must be float16"):
        layer.append_block(part, signs[0], u[0].float(), v[0])
    with pytest.raises(RuntimeError, match="signs must be uint8"):
        layer.append_block(part, signs[0][:, :-1], u[0], v[0])
    with pytest.raises(RuntimeError, match="no part 3"):
        layer.set_active_blocks(3, 0)
    with pytest.raises(RuntimeError, match="outside the stored"):
        layer.set_active_blocks(part, 2)
    with pytest.raises(RuntimeError, match="small_rank_max must be >= 0"):
        kernels.BitStackLinear(40, 10, None, "auto", small_rank_max=-1)
    with pytest.raises(RuntimeError, match="isa must be"):
        kernels.BitStackLinear(40, 10, None, "sse")
    with pytest.raises(RuntimeError, match="x must be a contiguous CPU tensor"):
        layer(torch.randn(1, 41))


def test_rebuilding_path_after_a_call_in_inference_mode():
    """The engine runs under torch.inference_mode; the process-wide matmul scratch it leaves
    behind must not break a later call outside that mode (an in-place write to an inference
    tensor is an error there)."""
    parts = [random_blocks(21, 150, 16, 2, 14)]
    layer = make_layer(parts, 150, None, "reference")
    with torch.inference_mode():
        layer(torch.randn(3, 150))
    x = torch.randn(2, 150)
    weight = dense_weight(parts, 150)
    slack = 1e-5 * (x.abs() @ weight.abs().t()) + 1e-6
    assert ((layer(x) - F.linear(x, weight)).abs() <= slack).all()

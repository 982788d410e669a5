"""Attention over the int8 KV cache: the torch reference and the CPU kernels.

The reference (`torch_paged`'s int8 path) must equal float64 attention over the dequantized
cache; the decode kernel (float32 FMA loop and AVX512-BF16 loop) must match it on the cases
the float decode tests cover: odd lengths, GQA groups of several sizes, and stale slots
(NaN in every slot outside a context, in the values and in the scales).
"""

from __future__ import annotations

import pytest
import torch

from fitserve.attention import torch_paged
from fitserve.attention.cache_layout import dequantize_int8, quantize_int8
from fitserve.kernels import cpu
from tests.kernels.test_cpu_kernels import _paged_case, _reference

kernels = cpu.get()


def _int8_case(dtype, seq_lens, **case):
    """A paged case whose caches are quantized: (query, caches (k, v, k_scales, v_scales),
    metadata, dequantized float64 caches for the reference)."""
    query, key_cache, value_cache, metadata = _paged_case(dtype, seq_lens, **case)
    # Heads of different magnitudes, as in real models: each needs its own scale.
    magnitudes = torch.linspace(0.2, 4.0, key_cache.shape[2])[None, None, :, None]
    key_values, key_scales = quantize_int8(key_cache.float() * magnitudes)
    value_values, value_scales = quantize_int8(value_cache.float() * magnitudes)
    dequantized = (dequantize_int8(key_values, key_scales).double(), dequantize_int8(value_values, value_scales).double())
    return query, (key_values, value_values, key_scales, value_scales), metadata, dequantized


def _mark_stale(caches, metadata, seq_lens, block_size):
    """Every slot outside a context: int8 garbage and NaN scales (a reused block holds anything)."""
    key_values, value_values, key_scales, value_scales = caches
    used = torch.zeros(key_values.shape[0] * block_size, dtype=torch.bool)
    for index, length in enumerate(seq_lens):
        for position in range(length):
            used[int(metadata.block_tables[index, position // block_size]) * block_size + position % block_size] = True
    for values in (key_values, value_values):
        values.view(-1, *values.shape[2:])[~used] = -128
    for scales in (key_scales, value_scales):
        scales.view(-1, scales.shape[2])[~used] = float("nan")


def test_quantize_int8_rounds_per_token_and_head():
    x = torch.tensor([[[1.0, -2.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    values, scales = quantize_int8(x)
    assert values.dtype == torch.int8 and scales.shape == (1, 2)
    assert values[0, 0].tolist() == [64, -127, 32, 0]  # 63.5 and 31.75 round to nearest
    assert scales[0, 0].item() == pytest.approx(2.0 / 127) and scales[0, 1].item() == 0.0
    assert values[0, 1].tolist() == [0, 0, 0, 0]
    wide = torch.randn(50, 3, 64) * torch.tensor([0.01, 1.0, 100.0])[:, None]
    wide_values, wide_scales = quantize_int8(wide)
    error = (dequantize_int8(wide_values, wide_scales) - wide).abs()
    assert (error <= wide_scales[..., None] / 2 * 1.0001).all(), "at most half a step per element"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_reference_equals_attention_over_the_dequantized_cache(dtype):
    seq_lens = [1, 5, 17, 40]
    query, caches, metadata, dequantized = _int8_case(dtype, seq_lens, num_heads=6, num_kv_heads=2, head_dim=32)
    block_size = metadata.block_size
    max_blocks = metadata.block_tables.shape[1]
    table = metadata.block_tables.long()
    visible = (torch.arange(max_blocks * block_size)[None, :] < metadata.seq_lens[:, None])[:, None, :]
    key_values, value_values, key_scales, value_scales = caches
    ours = torch_paged._int8_attention(
        query[:, None], key_values[table].flatten(1, 2), key_scales[table].flatten(1, 2),
        value_values[table].flatten(1, 2), value_scales[table].flatten(1, 2), visible, 32**-0.5,
    )[:, 0]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    expected = _reference(query, *dequantized, metadata, 32**-0.5)
    torch.testing.assert_close(ours.double(), expected, atol=tolerance, rtol=tolerance)


def _kernel_output(query, caches, metadata, scale):
    key_values, value_values, key_scales, value_scales = caches
    out = torch.empty_like(query)
    kernels.paged_decode_attention(query, key_values, value_values, metadata.block_tables, metadata.seq_lens,
                                   torch.arange(len(metadata.seq_lens_cpu)), out, scale, key_scales, value_scales)
    return out


needs_kernels = pytest.mark.skipif(kernels is None, reason="CPU kernels unavailable (no AVX2 or no compiler)")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "num_heads", "num_kv_heads"),
                         [(24, 4, 2), (32, 2, 2), (64, 14, 2), (64, 24, 2), (128, 8, 2), (80, 6, 3)])
@pytest.mark.parametrize("block_size", [4, 16])
def test_decode_kernel_over_int8_matches_reference_with_stale_slots(dtype, head_dim, num_heads, num_kv_heads,
                                                                    block_size):
    # bf16 queries with head_dim 32/64/128 take the AVX512-BF16 loop where the CPU has it
    # (int8 blocks widened while packing), the rest the float32 FMA loop; odd lengths cross
    # the 8- and 16-token groups; GQA groups of 1 to 12 heads.
    seq_lens = [1, 5, 15, 16, 17, 47, 100]
    query, caches, metadata, dequantized = _int8_case(dtype, seq_lens, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                                      head_dim=head_dim, block_size=block_size, seed=5)
    _mark_stale(caches, metadata, seq_lens, block_size)
    out = _kernel_output(query, caches, metadata, head_dim**-0.5)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), _reference(query, *dequantized, metadata, head_dim**-0.5),
                               atol=tolerance, rtol=tolerance)


@needs_kernels
def test_decode_kernel_refuses_int8_without_scales():
    query, caches, metadata, _ = _int8_case(torch.float32, [3])
    with pytest.raises(RuntimeError, match="int8 KV cache comes with key and value scales"):
        kernels.paged_decode_attention(query, caches[0], caches[1], metadata.block_tables, metadata.seq_lens,
                                       torch.arange(1), torch.empty_like(query), 1.0)


@needs_kernels
@pytest.mark.parametrize(("dtype", "avx512"), [(torch.bfloat16, True), (torch.bfloat16, False), (torch.float32, True)])
@pytest.mark.parametrize(("head_dim", "num_heads", "num_kv_heads"), [(32, 2, 2), (64, 6, 2), (128, 8, 1)])
@pytest.mark.parametrize(("query_len", "context_len"), [(1, 1), (7, 7), (33, 33), (5, 70), (40, 131)])
def test_prefill_kernel_over_int8_matches_reference(dtype, avx512, head_dim, num_heads, num_kv_heads, query_len,
                                                    context_len):
    # bf16 queries: the AVX512-BF16 loop (where the CPU has it) and the AVX2 loop; float32:
    # AVX2. Whole prompts and chunks at the end of a longer context, at odd lengths that cut
    # the 16-key blocks and the 6-row tiles; GQA groups of 1, 3 and 8.
    generator = torch.Generator().manual_seed(query_len * 1000 + context_len)
    magnitudes = torch.linspace(0.5, 3.0, num_kv_heads)[None, :, None]
    key_values, key_scales = quantize_int8(torch.randn(context_len, num_kv_heads, head_dim, generator=generator) * magnitudes)
    value_values, value_scales = quantize_int8(torch.randn(context_len, num_kv_heads, head_dim, generator=generator))
    query = torch.randn(query_len, num_heads, head_dim, generator=generator).to(dtype)
    out = torch.empty_like(query)
    scale = head_dim**-0.5
    kernels.prefill_attention_int8(query, key_values, value_values, key_scales, value_scales, out, scale, avx512)
    positions = torch.arange(context_len - query_len, context_len)
    visible = torch.arange(context_len)[None, :] <= positions[:, None]
    expected = torch_paged._int8_attention(query[None].float(), key_values[None], key_scales[None],
                                           value_values[None], value_scales[None], visible[None], scale)[0]
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)

"""The Triton path over the int8 KV cache against the torch reference (`torch_paged`).

Without a GPU these run in Triton's CPU interpreter (tests/conftest.py). The quantizing
stores (`write_kv`, `rotary_and_write_kv`) must write the torch path's bytes; the decode and
prefill kernels must match the torch reference's int8 attention on odd lengths, GQA groups,
contexts split over several decode programs, and stale slots (garbage int8 values and NaN
scales outside every context).
"""

from __future__ import annotations

import pytest
import torch

from fitserve.attention import torch_paged
from fitserve.attention.cache_layout import quantize_int8
from fitserve.attention.triton_decode import decode_attention
from fitserve.attention.triton_paged import paged_attention, write_kv
from fitserve.attention.triton_prefill import prefill_attention
from fitserve.kernels import triton_ops
from fitserve.models.rope import apply_rotary
from tests.attention.test_triton_paged import DEVICE, NUM_KV_HEADS, PagedBatch, make_batch

DTYPES = [torch.float32, torch.bfloat16]


def _int8_caches(batch: PagedBatch) -> tuple[torch.Tensor, ...]:
    """The batch's caches quantized (heads of different magnitudes), stale slots poisoned."""
    magnitudes = torch.linspace(0.3, 3.0, NUM_KV_HEADS, device=batch.key_cache.device)[None, None, :, None]
    key_values, key_scales = quantize_int8(batch.key_cache.float() * magnitudes)
    value_values, value_scales = quantize_int8(batch.value_cache.float())
    used = torch.zeros(key_values.shape[0] * key_values.shape[1], dtype=torch.bool, device=key_values.device)
    metadata = batch.metadata
    for index, length in enumerate(metadata.seq_lens_cpu):
        positions = torch.arange(length, device=key_values.device)
        blocks = metadata.block_tables[index].long()[positions // metadata.block_size]
        used[blocks * metadata.block_size + positions % metadata.block_size] = True
    for values, scales in ((key_values, key_scales), (value_values, value_scales)):
        values.view(-1, *values.shape[2:])[~used] = -128
        scales.view(-1, scales.shape[2])[~used] = float("nan")
    return key_values, value_values, key_scales, value_scales


def _reference(batch: PagedBatch, caches: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The torch reference, in float32 on the CPU."""
    metadata = batch.metadata
    cpu_metadata = type(metadata)(**{name: value.cpu() if isinstance(value, torch.Tensor) else value
                                     for name, value in vars(metadata).items()})
    key_values, value_values, key_scales, value_scales = (tensor.cpu() for tensor in caches)
    return torch_paged.int8_attention_reference(batch.query.cpu().float(), key_values, value_values, key_scales,
                                                value_scales, cpu_metadata, batch.scale)


def _assert_close(actual: torch.Tensor, batch: PagedBatch, caches: tuple[torch.Tensor, ...]) -> None:
    assert actual.dtype == batch.query.dtype and actual.shape == batch.query.shape
    tolerance = 2e-5 if batch.query.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.float().cpu(), _reference(batch, caches), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_quantizes_like_torch(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_tokens, head_dim = 6, 16, 21, 32
    slot_mapping = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    fused = torch.randn((num_tokens, 3 * NUM_KV_HEADS * head_dim), generator=generator).to(dtype)
    kv_width = NUM_KV_HEADS * head_dim
    key = fused[:, kv_width : 2 * kv_width].view(num_tokens, NUM_KV_HEADS, head_dim) * 3
    value = fused[:, 2 * kv_width :].view(num_tokens, NUM_KV_HEADS, head_dim)
    key[0, 1] = 0  # an all-zero head: scale 0
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    expected = [torch.zeros(cache_shape, dtype=torch.int8), torch.zeros(cache_shape, dtype=torch.int8),
                torch.zeros(cache_shape[:3]), torch.zeros(cache_shape[:3])]
    torch_paged.write_kv(key, value, expected[0], expected[1], slot_mapping, expected[2], expected[3])
    caches = [torch.zeros_like(tensor, device=DEVICE) for tensor in expected]
    write_kv(key.to(DEVICE), value.to(DEVICE), caches[0], caches[1], slot_mapping.to(DEVICE), caches[2], caches[3])
    for actual, wanted in zip(caches, expected, strict=True):
        assert torch.equal(actual.cpu(), wanted)
    assert expected[0].abs().max() == 127 and expected[2].count_nonzero() == num_tokens * NUM_KV_HEADS - 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_and_write_kv_quantizes_like_rotary_then_write_kv(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(9)
    tokens, heads, kv_heads, num_blocks, block_size, head_dim = 4, 4, 2, 6, 4, 64
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=generator).to(DEVICE, dtype)
    query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    query, key, value = (t.view(tokens, -1, head_dim) for t in (query, key, value))
    angles = torch.randn(tokens, head_dim // 2, generator=generator).to(DEVICE) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slot_mapping = torch.tensor([5, -1, 0, 22], device=DEVICE)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    caches = [torch.full(cache_shape, 7, dtype=torch.int8, device=DEVICE),
              torch.full(cache_shape, 7, dtype=torch.int8, device=DEVICE),
              torch.full(cache_shape[:3], 7.0, device=DEVICE), torch.full(cache_shape[:3], 7.0, device=DEVICE)]
    expected = [tensor.clone() for tensor in caches]
    written = slot_mapping >= 0
    expected_query = apply_rotary(query, cos, sin)
    torch_paged.write_kv(apply_rotary(key, cos, sin)[written], value[written], expected[0], expected[1],
                         slot_mapping[written], expected[2], expected[3])

    triton_ops.rotary_and_write_kv(query, key, value, cos, sin, caches[0], caches[1], slot_mapping,
                                   caches[2], caches[3])

    assert torch.equal(query, expected_query)
    for actual, wanted in zip(caches, expected, strict=True):
        assert torch.equal(actual, wanted)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 3])
def test_decode_over_int8_matches_reference(dtype: torch.dtype, group_size: int) -> None:
    # Odd lengths, one of them split over several partitions (partition 32, tiles of 16).
    batch = make_batch([1, 1, 1, 1], [1, 17, 40, 95], block_size=16, group_size=group_size, dtype=dtype, seed=3)
    caches = _int8_caches(batch)
    output = decode_attention(batch.query, caches[0], caches[1], batch.metadata, batch.scale, partition_size=32,
                              tile_n=16, key_scales=caches[2], value_scales=caches[3])
    _assert_close(output, batch, caches)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group_size", [1, 4])
def test_prefill_over_int8_matches_reference(dtype: torch.dtype, group_size: int) -> None:
    # A whole prompt, a chunk after cached context, and a decode, in one batch.
    batch = make_batch([23, 9, 1], [23, 50, 33], block_size=8, group_size=group_size, dtype=dtype, seed=4)
    caches = _int8_caches(batch)
    output = prefill_attention(batch.query, caches[0], caches[1], batch.metadata, batch.scale,
                               key_scales=caches[2], value_scales=caches[3])
    _assert_close(output, batch, caches)
    dispatched = paged_attention(batch.query, caches[0], caches[1], batch.metadata, batch.scale,
                                 caches[2], caches[3])
    assert torch.equal(dispatched, output)

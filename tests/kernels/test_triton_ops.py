"""The GPU path's fused per-layer ops give the torch code's results, rounding included.

The references below are the torch code of `fitserve.models.llama` (which follows
transformers) written out, so that these tests do not depend on which path the model takes.
On a machine without a GPU the kernels run in Triton's interpreter (tests/conftest.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fitserve.kernels import triton_ops
from fitserve.models.rope import apply_rotary

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16]


def reference_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x_float = x.float()
    x_float = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x_float.to(x.dtype)


def assert_same_up_to_reduction_order(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """A sum of squares added in another order may move the result by an ulp or so."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    tolerance = 2**-7 if actual.dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance * 1e-2)


def randn(*shape: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator).to(dtype).to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", [64, 96, 4096])
def test_rms_norm_matches_torch(dtype: torch.dtype, hidden: int) -> None:
    x = randn(5, hidden, dtype=dtype, seed=0) * 3
    weight = 1 + 0.1 * randn(hidden, dtype=dtype, seed=1)
    assert_same_up_to_reduction_order(triton_ops.rms_norm(x, weight, 1e-6), reference_rms_norm(x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_per_head_rms_norm_reads_a_strided_view(dtype: torch.dtype) -> None:
    """Qwen3's q/k norm: each head of a [tokens, heads, head_dim] slice of the QKV output."""
    tokens, heads, head_dim = 3, 4, 32
    qkv = randn(tokens, (heads + 2) * head_dim, dtype=dtype, seed=2)
    query = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    weight = 1 + 0.1 * randn(head_dim, dtype=dtype, seed=3)
    actual = triton_ops.rms_norm(query, weight, 1e-6)
    assert actual.is_contiguous()
    assert_same_up_to_reduction_order(actual, reference_rms_norm(query, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_rounds_the_sum_and_leaves_it_in_the_residual(dtype: torch.dtype) -> None:
    hidden = 96
    x = randn(4, hidden, dtype=dtype, seed=4)
    residual = randn(4, hidden, dtype=dtype, seed=5) * 10
    weight = 1 + 0.1 * randn(hidden, dtype=dtype, seed=6)
    expected_sum = residual + x
    expected = reference_rms_norm(expected_sum, weight, 1e-5)

    normed, summed = triton_ops.add_rms_norm(x, residual, weight, 1e-5)

    assert summed.data_ptr() == residual.data_ptr()
    assert torch.equal(summed, expected_sum)
    assert_same_up_to_reduction_order(normed, expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("intermediate", [48, 1500])
def test_silu_mul_matches_torch(dtype: torch.dtype, intermediate: int) -> None:
    """1500 spans two programs of a row, the second one partly masked."""
    gate_up = randn(3, 2 * intermediate, dtype=dtype, seed=8) * 4
    gate, up = gate_up.split(intermediate, dim=-1)
    expected = F.silu(gate) * up
    actual = triton_ops.silu_mul(gate_up)
    assert actual.shape == expected.shape
    # exp differs between libraries by an ulp of float32, which rounding to bf16 almost always
    # absorbs; float32 may keep it.
    torch.testing.assert_close(actual, expected, rtol=2**-8 if dtype == torch.bfloat16 else 2e-6, atol=1e-6)


def test_empty_batches_launch_nothing() -> None:
    empty = torch.empty((0, 64), device=DEVICE)
    weight = torch.ones(64, device=DEVICE)
    assert triton_ops.rms_norm(empty, weight, 1e-6).shape == (0, 64)
    assert triton_ops.add_rms_norm(empty, empty.clone(), weight, 1e-6)[0].shape == (0, 64)
    assert triton_ops.silu_mul(empty).shape == (0, 32)
    heads = empty.view(0, 1, 64)
    cache = torch.zeros((1, 4, 1, 64), device=DEVICE)
    triton_ops.rotary_and_write_kv(heads, heads, heads, empty, empty, cache, cache.clone(),
                                   torch.empty(0, dtype=torch.long, device=DEVICE))
    assert not cache.any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 80])
def test_rotary_and_write_kv_equals_rotary_then_write_kv(dtype: torch.dtype, head_dim: int) -> None:
    """The fused launch after the QKV projection: q rotated in place, rotated k and v in their
    cache slots, bit for bit as apply_rotary + torch_paged.write_kv; a negative slot (a
    padding token) stores nothing."""
    from fitserve.attention import torch_paged

    tokens, heads, kv_heads, num_blocks, block_size = 4, 4, 2, 6, 4
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=9)
    query, key, value = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    query = query.view(tokens, heads, head_dim)
    key = key.view(tokens, kv_heads, head_dim)
    value = value.view(tokens, kv_heads, head_dim)
    angles = randn(tokens, head_dim // 2, dtype=torch.float32, seed=10) * 3
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slot_mapping = torch.tensor([5, -1, 0, 22], device=DEVICE)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    key_cache = torch.full(cache_shape, 7.0, dtype=dtype, device=DEVICE)
    value_cache = torch.full(cache_shape, 7.0, dtype=dtype, device=DEVICE)
    expected_key_cache, expected_value_cache = key_cache.clone(), value_cache.clone()
    written = slot_mapping >= 0
    expected_query = apply_rotary(query, cos, sin)
    torch_paged.write_kv(apply_rotary(key, cos, sin)[written], value[written],
                         expected_key_cache, expected_value_cache, slot_mapping[written])
    unrotated_key = key.clone()

    triton_ops.rotary_and_write_kv(query, key, value, cos, sin, key_cache, value_cache, slot_mapping)

    assert torch.equal(query, expected_query)
    assert torch.equal(key_cache, expected_key_cache)
    assert torch.equal(value_cache, expected_value_cache)
    assert torch.equal(key, unrotated_key)

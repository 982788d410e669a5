"""The fused C++ decode stack gives bit-identical results to the Python decoder path.

Users rely on this twice: switching the fast path on must not change a single greedy token
(float32 parity with transformers is proven on the Python path), and the KV cache it writes
is read by later steps, including prefills of other sequences that take the Python path.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fitserve.attention.cache_layout import LayerKVCache
from fitserve.kernels import cpu
from fitserve.models.loader import load_model

from tests.models.conftest import PagedKVCache

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(cpu.get() is None, reason="CPU kernels unavailable (no AVX2 or no compiler)")


def _clone_caches(caches: list[LayerKVCache]) -> list[LayerKVCache]:
    return [LayerKVCache(*(None if tensor is None else tensor.clone() for tensor in layer)) for layer in caches]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch", [1, 3, 20])
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_fused_decode_is_bit_identical_to_the_python_path(variant, dtype, batch, kv_cache_dtype, make_checkpoint,
                                                          token_ids):
    """Decode steps of 1, 3 and 20 sequences (one token each; 20 exceeds the streaming kernel's
    row limit, so the matmul library path runs too) over scattered blocks of different lengths;
    with an int8 cache the stack's quantizing write must store the Python path's bytes."""
    checkpoint = make_checkpoint(variant, dtype=str(dtype).removeprefix("torch."))
    model, config = load_model(checkpoint, dtype, CPU, "torch")
    cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                         num_blocks=8 * batch + 4, dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    sequences = [cache.new_sequence(token_ids(5 + 3 * index % 17, index)) for index in range(batch)]
    prompt_lens = [len(sequence.token_ids) - 3 for sequence in sequences]
    with torch.no_grad():
        input_ids, positions, metadata = cache.step(list(zip(sequences, prompt_lens)))
        assert not model.fused_cpu_decode.applies(input_ids, cache.kv_caches, metadata)
        model(input_ids, positions, cache.kv_caches, metadata)  # prefill, on the Python path

        for _ in range(3):
            input_ids, positions, metadata = cache.step([(sequence, 1) for sequence in sequences])
            python_caches = _clone_caches(cache.kv_caches)
            model.fused_cpu_decode.enabled = False
            expected = model(input_ids, positions, python_caches, metadata)
            model.fused_cpu_decode.enabled = True
            assert model.fused_cpu_decode.applies(input_ids, cache.kv_caches, metadata)
            fused = model(input_ids, positions, cache.kv_caches, metadata)

            assert fused.dtype == dtype and fused.shape == (batch, config.hidden_size)
            assert torch.equal(fused, expected)
            for layer, expected_layer in zip(cache.kv_caches, python_caches, strict=True):
                assert layer.is_int8 == (kv_cache_dtype == "int8")
                for tensor, expected_tensor in zip(layer, expected_layer, strict=True):
                    assert (tensor is None and expected_tensor is None) or torch.equal(tensor, expected_tensor)


def test_fused_decode_follows_a_new_kv_cache_and_recast_weights(make_checkpoint, token_ids):
    """The stack holds references: a fresh cache list, or parameters re-created by a cast,
    must be picked up rather than writing into (or reading) stale tensors."""
    checkpoint = make_checkpoint("qwen2_bias")
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")

    def decode_once(dtype: torch.dtype) -> tuple[torch.Tensor, PagedKVCache]:
        cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype=dtype)
        sequence = cache.new_sequence(token_ids(9, 0))
        with torch.no_grad():
            input_ids, positions, metadata = cache.step([(sequence, 8)])
            model(input_ids, positions, cache.kv_caches, metadata)
            input_ids, positions, metadata = cache.step([(sequence, 1)])
            model.fused_cpu_decode.enabled = False
            expected = model(input_ids, positions, _clone_caches(cache.kv_caches), metadata)
            model.fused_cpu_decode.enabled = True
            return torch.stack([expected, model(input_ids, positions, cache.kv_caches, metadata)]), cache

    first, first_cache = decode_once(torch.float32)
    assert torch.equal(first[0], first[1])
    second, second_cache = decode_once(torch.float32)  # another cache: the new one is written
    assert torch.equal(second[0], second[1])
    assert torch.equal(first_cache.kv_caches[0][0], second_cache.kv_caches[0][0])

    model.to(torch.bfloat16)
    model.rotary_emb.reset_inv_freq()
    recast, _ = decode_once(torch.bfloat16)
    assert recast.dtype == torch.bfloat16
    assert torch.equal(recast[0], recast[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_fused_decode_past_the_first_rotary_table_chunk(dtype, make_checkpoint, token_ids):
    """The fused step looks its rotary rows up in a table grown 4096 positions at a time:
    decoding across that boundary (4094 -> 4097) must stay bit-identical to computing them."""
    checkpoint = make_checkpoint("llama3_rope_scaling", dtype=str(dtype).removeprefix("torch."))
    model, config = load_model(checkpoint, dtype, CPU, "torch")
    cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                         block_size=16, num_blocks=260, dtype=dtype)
    sequence = cache.new_sequence(token_ids(4098, 3))
    with torch.no_grad():
        input_ids, positions, metadata = cache.step([(sequence, 4094)])
        model(input_ids, positions, cache.kv_caches, metadata)
        for _ in range(3):
            input_ids, positions, metadata = cache.step([(sequence, 1)])
            model.fused_cpu_decode.enabled = False
            expected = model(input_ids, positions, _clone_caches(cache.kv_caches), metadata)
            model.fused_cpu_decode.enabled = True
            assert model.fused_cpu_decode.applies(input_ids, cache.kv_caches, metadata)
            assert torch.equal(model(input_ids, positions, cache.kv_caches, metadata), expected)
    assert model.rotary_emb.table(dtype, 1)[0].shape[0] == 8192


def test_fused_decode_is_off_for_prefill_and_mixed_steps(make_checkpoint, token_ids):
    checkpoint = make_checkpoint("llama2")
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    decoding, prefilling = cache.new_sequence(token_ids(6, 0)), cache.new_sequence(token_ids(4, 1))
    with torch.no_grad():
        input_ids, positions, metadata = cache.step([(decoding, 5)])
        model(input_ids, positions, cache.kv_caches, metadata)
        input_ids, positions, metadata = cache.step([(decoding, 1), (prefilling, 4)])
        assert not model.fused_cpu_decode.applies(input_ids, cache.kv_caches, metadata)


def test_a_dropped_model_is_freed_at_once(make_checkpoint, token_ids):
    """The fused path's back-reference must not form a cycle: a server that swaps models gets
    the old weights' memory back when the last reference goes, not at some later GC pass."""
    checkpoint = make_checkpoint("qwen2_bias")
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim)
    sequence = cache.new_sequence(token_ids(6, 0))
    with torch.no_grad():
        input_ids, positions, metadata = cache.step([(sequence, 5)])
        model(input_ids, positions, cache.kv_caches, metadata)
        input_ids, positions, metadata = cache.step([(sequence, 1)])
        assert model.fused_cpu_decode.applies(input_ids, cache.kv_caches, metadata)
        model(input_ids, positions, cache.kv_caches, metadata)
    alive = weakref.ref(model)
    gc.disable()
    try:
        del model
        assert alive() is None
    finally:
        gc.enable()

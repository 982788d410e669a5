"""Roofline: bytes and FLOPs per step from config.json, the micro-benchmarks, the fractions."""

import json

import pytest
import torch

from fitserve.bench import roofline
from fitserve.bench.roofline import (ModelShape, achieved_fractions, measure_dtype_matmul_flops,
                                     measure_hardware_limit, measure_matmul_flops, measure_memory_bandwidth)

LLAMA_3_8B = {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "model_type": "llama"}


def test_llama_3_8b_counts_match_the_published_shape():
    shape = ModelShape.from_config(LLAMA_3_8B)
    assert shape.head_dim == 128 and shape.dtype_bytes == 2
    assert shape.total_params == 8_030_261_248  # Meta-Llama-3-8B's parameter count
    # GQA: 8 KV heads of 128 dims, K and V, 32 layers, 2 bytes = 128 KiB per token.
    assert shape.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131072
    # One decode step reads every weight except the (untied) input embedding table.
    assert shape.weight_bytes_per_step == (8_030_261_248 - 128256 * 4096) * 2


def test_int8_kv_cache_counts_one_byte_per_element_plus_a_scale_per_token_and_head(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B))
    dense = ModelShape.from_model_dir(tmp_path, "bfloat16")
    int8 = ModelShape.from_model_dir(tmp_path, "bfloat16", kv_cache_dtype="int8")
    # 32 layers x 8 KV heads x (K and V): 128 int8 values and one float32 scale each.
    assert int8.kv_bytes_per_token == 2 * 32 * 8 * (128 + 4)
    assert int8.decode_step_bytes(4, 1000) - dense.decode_step_bytes(4, 1000) == \
        4 * 1001 * (int8.kv_bytes_per_token - dense.kv_bytes_per_token)
    assert int8.to_dict()["kv_cache_dtype"] == "int8"


def test_step_costs_by_hand_for_a_tiny_tied_model():
    config = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 10, "tie_word_embeddings": True, "torch_dtype": "float32"}
    shape = ModelShape.from_config(config)
    # Per layer: q,o 2·8·8 = 128; k,v 2·8·4 = 64; MLP 3·8·16 = 384 -> 576 matmul weights; norms 16.
    assert shape.layer_matmul_params == 576
    assert shape.total_params == 80 + 8 + 2 * (576 + 16)
    assert shape.matmul_params_per_token == 2 * 576 + 80  # the tied table is the LM head
    assert shape.weight_bytes_per_step == shape.total_params * 4
    assert shape.kv_bytes_per_token == 2 * 2 * 1 * 4 * 4
    # Decode, batch 3 at context 10: weights once + KV read for 10 and written for 1, per request.
    assert shape.decode_step_bytes(3, 10) == shape.total_params * 4 + 3 * 11 * 64
    # Attention FLOPs: 4 · layers · heads · head_dim · queries · keys.
    assert shape.decode_step_flops(3, 10) == 3 * (2 * 1232 + 4 * 2 * 2 * 4 * 10)
    # Prefill of 5 tokens: both layers for each, causal attention, the 80-weight head once.
    assert shape.prefill_flops(5) == 2 * 2 * 576 * 5 + 4 * 2 * 2 * 4 * 5 * 3 + 2 * 80


def test_shape_reads_the_model_directory_and_resolves_dtype(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_3_8B | {"torch_dtype": "float16"}))
    # On CPU the server runs float16 checkpoints in bfloat16 (same size); float32 if asked.
    assert ModelShape.from_model_dir(tmp_path).dtype_name == "bfloat16"
    assert ModelShape.from_model_dir(tmp_path, "float32").dtype_bytes == 4


def test_micro_benchmarks_measure_plausible_rates():
    bandwidth = measure_memory_bandwidth(torch.device("cpu"), size_bytes=32 * 2**20, min_time_s=0.05)
    flops, size = measure_matmul_flops(torch.device("cpu"), torch.float32, min_time_s=0.05, max_size=512)
    assert 1e8 < bandwidth < 1e13  # between 100 MB/s and 10 TB/s: a copy really ran and was timed
    assert 1e7 < flops < 1e15 and size <= 512
    limit = measure_hardware_limit(torch.device("cpu"), torch.float32, min_time_s=0.05)
    assert limit["memory_bandwidth_bytes_per_s"] > 0 and limit["dtype"] == "float32"


@pytest.mark.parametrize("bf16_rate, expected", [(2e9, (1.7e11, 1024, "float32")), (4e11, (4e11, 512, "bfloat16"))],
                         ids=["no-bf16-arithmetic", "native-bf16"])
def test_bf16_matmul_limit_is_the_faster_of_bf16_and_widened_float32(monkeypatch, bf16_rate, expected):
    # Without bf16 arithmetic torch's bf16 matmul crawls; the machine still multiplies bf16
    # matrices at its float32 rate by widening them, so that is the limit a bf16 run is held to.
    rates = {torch.bfloat16: (bf16_rate, 512), torch.float32: (1.7e11, 1024)}
    monkeypatch.setattr(roofline, "measure_matmul_flops", lambda device, dtype, **_: rates[dtype])
    assert measure_dtype_matmul_flops(torch.device("cpu"), torch.bfloat16) == expected
    assert measure_dtype_matmul_flops(torch.device("cpu"), torch.float32) == (1.7e11, 1024, "float32")
    # A float32 rate just measured is reused rather than measured again.
    assert measure_dtype_matmul_flops(torch.device("cpu"), torch.bfloat16, float32_measured=(1e11, 256))[0] == max(
        bf16_rate, 1e11)
    limit = measure_hardware_limit(torch.device("cpu"), torch.bfloat16, min_time_s=0.05)
    assert (limit["matmul_flops_per_s"], limit["matmul_arithmetic"]) == (expected[0], expected[2])


def test_achieved_fractions_by_hand():
    config = {"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "num_key_value_heads": 1, "vocab_size": 10, "tie_word_embeddings": True, "torch_dtype": "float32"}
    shape = ModelShape.from_config(config)
    limit = {"memory_bandwidth_bytes_per_s": 1e6, "matmul_flops_per_s": 1e12}  # memory-bound
    summary = {"mean_input_tokens": 10.0, "mean_output_tokens": 2.0, "mean_concurrent_decodes": 2.0,
               "tpot_ms": {"median": 10.0}, "ttft_ms": {"min": 20.0}}
    fractions = achieved_fractions(shape, limit, summary)
    decode = fractions["decode"]
    step_bytes = shape.total_params * 4 + 2 * 12 * 64  # context 10 + 2/2 = 11, plus the new token
    assert decode["bytes_per_step"] == step_bytes and decode["bound"] == "memory"
    assert decode["fraction_of_limit"] == pytest.approx(step_bytes / 1e6 / 0.010)
    assert decode["achieved_tokens_per_s"] == pytest.approx(200.0)
    prefill = fractions["prefill"]
    assert prefill["fraction_of_limit"] == pytest.approx((shape.total_params * 4 + 10 * 64) / 1e6 / 0.020)
    empty = achieved_fractions(shape, limit, {"tpot_ms": {"median": None}, "ttft_ms": {"min": None}})
    assert empty == {"decode": None, "prefill": None}


def test_the_limit_is_the_higher_of_the_measurements_before_and_after():
    from fitserve.bench.roofline import combine_limits

    before = {"memory_bandwidth_bytes_per_s": 5e9, "matmul_flops_per_s": 1e10, "matmul_size": 512}
    after = {"memory_bandwidth_bytes_per_s": 4e9, "matmul_flops_per_s": 3e10, "matmul_size": 2048}
    combined = combine_limits(before, after)
    assert combined["memory_bandwidth_bytes_per_s"] == 5e9 and combined["matmul_flops_per_s"] == 3e10
    assert combined["matmul_size"] == 2048 and len(combined["measurements"]) == 2
    assert combine_limits(before, None)["matmul_flops_per_s"] == 1e10
    assert combine_limits(None, None) is None


def test_bandwidth_buffer_outgrows_large_caches(monkeypatch):
    # A 480 MiB last-level cache (a Xeon seen here) would hold a 256 MiB test buffer between
    # repeats and report the cache's speed; the buffer must be twice the cache instead.
    from fitserve.bench import roofline

    monkeypatch.setattr(roofline, "last_level_cache_bytes", lambda: 480 * 2**20)
    assert roofline.memory_test_bytes(torch.device("cpu")) == 960 * 2**20
    monkeypatch.setattr(roofline, "last_level_cache_bytes", lambda: 32 * 2**20)
    assert roofline.memory_test_bytes(torch.device("cpu")) == 256 * 2**20
    monkeypatch.setattr(roofline, "last_level_cache_bytes", lambda: None)
    assert roofline.memory_test_bytes(torch.device("cpu")) == 256 * 2**20
    assert roofline.memory_test_bytes(torch.device("cuda")) == 256 * 2**20


def test_bitstack_model_counts_its_blocks_or_the_budget_it_is_loaded_under():
    config = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
              "num_key_value_heads": 2, "vocab_size": 100, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
    names = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    prefixes = [f"model.layers.0.{'self_attn' if n[0] in 'qkvo' else 'mlp'}.{n}" for n in names]
    quantized = {**config, "quantization_config": {
        "quant_method": "fitserve", "method": "bitstack", "num_blocks": 3, "lm_head": "w8",
        "ranks": dict.fromkeys(prefixes, 4), "block_order": []}}
    # One block: N·ceil(K/8) sign bytes + 2·r·(N + K) factor bytes; 3 blocks per matrix.
    shapes = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    stack = sum(3 * (n * (k // 8) + 2 * 4 * (n + k)) for n, k in shapes)
    full = ModelShape.from_config(quantized)
    assert full.quantization == "bitstack"
    assert full.projection_bits == pytest.approx(8 * stack / full.layer_matmul_params)
    # Under a budget: what is left after the w8 table (100 x 64 int8 + a float32 scale per row:
    # 8.5 bits) and the bf16 norms.
    head = 100 * 64 * 8.5 / 8
    norms = (2 * 64 + 64) * 2
    budget = ModelShape.from_config(quantized, weight_memory=int(head + norms + 5000))
    assert budget.projection_bits == pytest.approx(8 * 5000 / full.layer_matmul_params)
    assert ModelShape.from_config(quantized, weight_memory=10**9).projection_bits == full.projection_bits

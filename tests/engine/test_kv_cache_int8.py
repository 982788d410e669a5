"""The int8 KV cache end to end: capacity, the flag, quality on the bundled model, and the
scheduling features (chunked prefill, prefix caching, preemption) on top of it.

Per-token scales make a token's stored bytes independent of which step wrote it, so every
way of computing a request (one-shot or chunked prefill, a prefix-cache hit, recomputation
after preemption) must give the same greedy tokens with the int8 cache as one-shot prefill
without any of those features.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fitserve import LLM, SamplingParams
from fitserve.config import ConfigError, EngineArgs, default_model_dir
from fitserve.engine.runner import allocate_kv_cache, kv_cache_bytes_per_block
from fitserve.models.config import load_model_config
from fitserve.quant.evaluate import heldout_windows
from tests.tiny_models import random_token_ids, write_tiny_checkpoint


def greedy(max_tokens: int = 12) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_capacity_is_at_least_1_85x_bfloat16_with_scales_counted(head_dim: int) -> None:
    bf16 = kv_cache_bytes_per_block(4, 2, head_dim, 16, torch.bfloat16)
    int8 = kv_cache_bytes_per_block(4, 2, head_dim, 16, torch.bfloat16, "int8")
    assert bf16 / int8 >= 1.85
    # The scales are counted: an int8 block is more than half a bf16 one.
    assert int8 > bf16 // 2


def test_allocated_int8_cache_matches_the_counted_bytes() -> None:
    caches = allocate_kv_cache(3, 5, 16, 2, 64, torch.bfloat16, torch.device("cpu"), "int8")
    layer = caches[1]
    assert layer.is_int8 and layer.key.dtype == torch.int8 and layer.key.shape == (5, 16, 2, 64)
    assert layer.key_scales.shape == (5, 16, 2) and layer.value_scales.dtype == torch.float32
    counted = kv_cache_bytes_per_block(3, 2, 64, 16, torch.bfloat16, "int8") * 5
    stored = sum(t.numel() * t.element_size() for layer in caches for t in layer)
    assert stored == counted
    float_layer = allocate_kv_cache(1, 5, 16, 2, 64, torch.bfloat16, torch.device("cpu"))[0]
    assert not float_layer.is_int8 and float_layer.key.dtype == torch.bfloat16


def test_unknown_kv_cache_dtype_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto or int8"):
        EngineArgs(kv_cache_dtype="fp8")


def test_banner_reports_about_twice_the_tokens_of_bfloat16(tmp_path: Path) -> None:
    # head_dim 64, the bundled model's and a common one (with 16 the scales would cost 20%).
    model_dir = write_tiny_checkpoint(tmp_path / "m", "llama3_rope_scaling", head_dim=64)
    engines = {dtype: LLM(str(model_dir), dtype="bfloat16", kv_cache_memory="2MiB", kv_cache_dtype=dtype).engine
               for dtype in ("auto", "int8")}
    ratio = engines["int8"].kv_capacity_tokens / engines["auto"].kv_capacity_tokens
    assert 1.85 <= ratio <= 2.0
    banner = engines["int8"].startup_summary()
    assert f"KV cache int8 {engines['int8'].num_kv_blocks} blocks" in banner
    assert f"= {engines['int8'].kv_capacity_tokens} tokens" in banner
    assert "KV cache bfloat16" in engines["auto"].startup_summary()


def test_scheduling_features_do_not_change_int8_tokens(tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "m", "llama3_rope_scaling")
    config = load_model_config(model_dir)
    block_size = 8
    prompts = [random_token_ids(40 + i, seed=20 + i) for i in range(4)]
    shared = prompts[0][:32]
    prompts.append(shared + random_token_ids(11, seed=7))  # hits 4 cached blocks of prompt 0
    plain = LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=block_size,
                kv_cache_dtype="int8", enable_chunked_prefill=False, enable_prefix_caching=False)
    expected = [output.outputs[0].token_ids
                for output in plain.generate([{"prompt_token_ids": p} for p in prompts], greedy(30))]
    bytes_per_block = kv_cache_bytes_per_block(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, torch.float32, "int8"
    )
    # 14 blocks for requests of 9-10 blocks each: they take turns (preemption); a 24-token
    # budget chunks every prefill mid-block.
    busy = LLM(str(model_dir), dtype="float32", kv_cache_memory=14 * bytes_per_block, block_size=block_size,
               max_num_batched_tokens=24, kv_cache_dtype="int8")
    first = busy.generate({"prompt_token_ids": prompts[0]}, greedy(30))[0]
    hit = busy.generate({"prompt_token_ids": prompts[4]}, greedy(30))[0]
    assert hit.metrics.num_cached_prompt_tokens == 32
    rest = busy.generate([{"prompt_token_ids": p} for p in prompts[1:4]], greedy(30))
    assert busy.engine.get_stats().num_preemptions_total > 0
    produced = [first, *rest, hit]
    assert [output.outputs[0].token_ids for output in produced] == expected


def _heldout_windows(tokenizer, count: int) -> list[list[int]]:
    text = (default_model_dir() / "heldout.txt").read_text(encoding="utf-8")
    return heldout_windows(tokenizer(text, add_special_tokens=False)["input_ids"])[:count]


def test_bundled_model_quality_with_int8_cache() -> None:
    """The model card's protocol on its first 8 held-out windows: perplexity within 0.3% of
    the float cache's; the card's greedy snippets mostly the same tokens."""
    evaluation = json.loads((default_model_dir() / "eval.json").read_text(encoding="utf-8"))
    prompts = [sample["prompt"] for sample in evaluation["samples"]]
    perplexities, continuations = {}, {}
    for kv_cache_dtype in ("auto", "int8"):
        llm = LLM(dtype="float32", kv_cache_dtype=kv_cache_dtype, kv_cache_memory="64MiB")
        windows = _heldout_windows(llm.engine.tokenizer, 8)
        results = llm.generate([{"prompt_token_ids": w} for w in windows],
                               SamplingParams(max_tokens=1, prompt_logprobs=0))
        nll = [-position[token].logprob for window, result in zip(windows, results)
               for token, position in zip(window[1:], result.prompt_logprobs[1:])]
        perplexities[kv_cache_dtype] = math.exp(sum(nll) / len(nll))
        outputs = llm.generate(prompts, greedy(evaluation["sample_new_tokens"]))
        continuations[kv_cache_dtype] = [token for o in outputs for token in o.outputs[0].token_ids]
    increase = perplexities["int8"] / perplexities["auto"] - 1
    assert abs(increase) <= 0.003, perplexities
    assert increase != 0, "the int8 cache must actually be in use"
    same = sum(a == b for a, b in zip(continuations["auto"], continuations["int8"]))
    assert same >= 0.75 * len(continuations["auto"])

"""End-to-end parity with transformers: the engine must produce exactly HF's greedy tokens.

Every scheduling feature (batching of ragged prompts, chunked prefill, prefix-cache hits,
preemption with recomputation) changes how tokens are computed but must not change which
tokens come out in float32. In bfloat16 rounding may flip near-ties, so there the check is
that at the first divergence each side's token is in the other's top 5.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from fitserve import LLM, SamplingParams
from fitserve.engine.runner import kv_cache_bytes_per_block
from fitserve.models.config import load_model_config
from tests.tiny_models import VARIANTS, random_token_ids, write_tiny_checkpoint

PROMPT_LENGTHS = (3, 17, 40, 70)
MAX_TOKENS = 12


def hf_greedy(model, prompt: list[int], max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """transformers' own greedy decoding, never stopping early; returns tokens and per-step logits."""
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
        output_logits=True, return_dict_in_generate=True,
    )
    result = model.generate(torch.tensor([prompt]), generation_config=config)
    tokens = result.sequences[0, len(prompt):].tolist()
    assert len(tokens) == max_new_tokens
    return tokens, [step_logits[0] for step_logits in result.logits]


def hf_model(model_dir: Path, dtype: torch.dtype = torch.float32):
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    # generate() fills an unset eos_token_id from the model's defaults; clear those so the
    # reference, like the engine under ignore_eos, never stops early.
    model.generation_config.eos_token_id = None
    return model


def greedy(max_tokens: int = MAX_TOKENS, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("chunked", [True, False], ids=["chunked", "one-shot"])
def test_greedy_batch_matches_transformers(tmp_path: Path, variant: str, chunked: bool) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / variant, variant)
    # A 32-token budget splits the 40- and 70-token prompts over several steps, interleaved
    # with the decodes of the short prompts; 8-token blocks put chunk edges mid-block.
    budget = 32 if chunked else 256
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8,
              max_num_batched_tokens=budget, enable_chunked_prefill=chunked)
    prompts = [random_token_ids(length, seed=length) for length in PROMPT_LENGTHS]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy())
    reference = hf_model(model_dir)
    for prompt, output in zip(prompts, outputs):
        expected, _ = hf_greedy(reference, prompt, MAX_TOKENS)
        assert output.outputs[0].token_ids == expected
        assert output.outputs[0].finish_reason == "length"
        assert output.prompt_token_ids == prompt


def test_prefix_cache_hits_skip_work_and_keep_tokens(tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "m", "llama3_rope_scaling")
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8)
    shared = random_token_ids(45, seed=1)
    prompts = [shared + random_token_ids(n, seed=10 + n) for n in (1, 6, 19)]
    first = llm.generate({"prompt_token_ids": prompts[0]}, greedy())[0]
    assert first.metrics.num_cached_prompt_tokens == 0
    later = llm.generate([{"prompt_token_ids": p} for p in prompts[1:]], greedy())
    # 45 shared tokens = 5 full blocks of 8 that the later prompts find in the cache.
    assert [o.metrics.num_cached_prompt_tokens for o in later] == [40, 40]
    assert llm.engine.get_stats().num_prefix_cache_hit_tokens_total == 80
    reference = hf_model(model_dir)
    for prompt, output in zip(prompts, [first, *later]):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, MAX_TOKENS)[0]
    # Repeating the very same prompt reuses every full block but still computes its last token.
    again = llm.generate({"prompt_token_ids": prompts[2]}, greedy())[0]
    assert again.metrics.num_cached_prompt_tokens == 56
    assert again.outputs[0].token_ids == later[1].outputs[0].token_ids


def test_prefix_caching_can_be_turned_off(tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "m", "qwen2_bias")
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8,
              enable_prefix_caching=False)
    prompt = random_token_ids(40, seed=3)
    outputs = [llm.generate({"prompt_token_ids": prompt}, greedy())[0] for _ in range(2)]
    assert outputs[1].metrics.num_cached_prompt_tokens == 0
    assert outputs[0].outputs[0].token_ids == outputs[1].outputs[0].token_ids


def test_preemption_recomputes_to_the_same_tokens(tmp_path: Path) -> None:
    variant = "llama3_rope_scaling"
    model_dir = write_tiny_checkpoint(tmp_path / "m", variant)
    config = load_model_config(model_dir)
    block_size = 8
    bytes_per_block = kv_cache_bytes_per_block(
        config.num_hidden_layers, config.num_key_value_heads, config.head_dim, block_size, torch.float32
    )
    # 14 blocks (112 tokens) for four requests that need 9-10 blocks each: they must take turns.
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory=14 * bytes_per_block,
              block_size=block_size, max_num_batched_tokens=64)
    prompts = [random_token_ids(40 + i, seed=20 + i) for i in range(4)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens=30))
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0
    assert sum(o.metrics.num_preemptions for o in outputs) == stats.num_preemptions_total
    assert stats.num_free_blocks == stats.num_total_blocks
    reference = hf_model(model_dir)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(reference, prompt, 30)[0]


@pytest.mark.parametrize("variant", ["llama3_rope_scaling", "qwen3_qk_norm"])
def test_bfloat16_diverges_only_between_top5_candidates(tmp_path: Path, variant: str) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / variant, variant, dtype="bfloat16")
    llm = LLM(str(model_dir), dtype="auto", kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=32)
    assert llm.engine.dtype == torch.bfloat16
    reference = hf_model(model_dir, torch.bfloat16)
    prompts = [random_token_ids(length, seed=100 + length) for length in (9, 33, 60)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens=24, logprobs=5))
    for prompt, output in zip(prompts, outputs):
        ours = output.outputs[0].token_ids
        theirs, their_logits = hf_greedy(reference, prompt, 24)
        divergence = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if divergence is None:
            continue
        their_top5 = torch.topk(their_logits[divergence].float(), 5).indices.tolist()
        our_top5 = sorted(output.outputs[0].logprobs[divergence].items(), key=lambda kv: kv[1].rank)
        our_top5_ids = [token for token, logprob in our_top5 if logprob.rank <= 5]
        assert ours[divergence] in their_top5
        assert theirs[divergence] in our_top5_ids

"""The GPU path end to end, without a GPU: greedy float32 tokens equal transformers'.

The engine runs with the Triton attention backend, which brings the fused Triton norms,
rotary + KV write and SiLU·up; on a machine without a GPU all of it runs in Triton's
interpreter (tests/conftest.py). Decode steps go through the static buffers that CUDA graphs
replay, run eagerly but with the kernels launched on the grids a captured graph uses (sized
for the longest context a graph serves, most programs returning at once), so scheduling,
padding, the spare padding block, the fused ops and the kernels are checked together.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve import LLM, SamplingParams
from fitserve.attention import triton_decode
from tests.engine.test_decode_graphs import install_static_decode
from tests.engine.test_parity import hf_greedy, hf_model
from tests.tiny_models import random_token_ids, write_tiny_checkpoint

PROMPT_LENGTHS = (3, 17, 40, 70)
MAX_TOKENS = 10


@pytest.mark.parametrize("variant", ["llama3_rope_scaling", "qwen3_qk_norm", "qwen2_bias"])
def test_triton_path_greedy_matches_transformers(tmp_path: Path, variant: str, monkeypatch) -> None:
    # 64-token partitions: a graph's grid for 256 positions has 4 per sequence, most of them
    # past the sequence's end, and a reduce over them.
    monkeypatch.setattr(triton_decode, "DEFAULT_PARTITION_SIZE", 64)
    model_dir = write_tiny_checkpoint(tmp_path / variant, variant)
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8,
              max_num_batched_tokens=32, attention_backend="triton")
    assert llm.engine.model.model.layers[0].mlp.triton_ops is not None
    padded_sizes = install_static_decode(llm, bounded_grids=True)

    prompts = [random_token_ids(length, seed=length) for length in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params)

    reference = hf_model(model_dir)
    for prompt, output in zip(prompts, outputs, strict=True):
        expected, _ = hf_greedy(reference, prompt, MAX_TOKENS)
        assert output.outputs[0].token_ids == expected
    assert padded_sizes, "decode steps should have gone through the static buffers"
    # Padding rows wrote only the spare block's first slot; no real row read its NaNs.
    padding_keys = llm.engine.runner.kv_caches[0][0][llm.engine.num_kv_blocks]
    assert torch.isnan(padding_keys[1:]).all()


def test_triton_path_with_int8_cache_gives_the_torch_paths_tokens(tmp_path: Path, monkeypatch) -> None:
    """The int8 cache on the GPU path (quantizing rotary + KV write, int8 decode and prefill
    kernels, the static decode buffers with their spare block) against the torch path's int8
    cache: the same bytes stored, attention in float32 over them, so the same greedy tokens."""
    monkeypatch.setattr(triton_decode, "DEFAULT_PARTITION_SIZE", 64)
    model_dir = write_tiny_checkpoint(tmp_path / "m", "llama3_rope_scaling")
    settings = dict(dtype="float32", kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=32,
                    kv_cache_dtype="int8")
    prompts = [{"prompt_token_ids": random_token_ids(length, seed=length)} for length in PROMPT_LENGTHS]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = LLM(str(model_dir), attention_backend="torch", **settings).generate(prompts, params)
    llm = LLM(str(model_dir), attention_backend="triton", **settings)
    padded_sizes = install_static_decode(llm, bounded_grids=True)
    outputs = llm.generate(prompts, params)

    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert padded_sizes, "decode steps should have gone through the static buffers"
    layer = llm.engine.runner.kv_caches[0]
    assert layer.is_int8 and layer.key.dtype == torch.int8
    assert torch.isnan(layer.key_scales[llm.engine.num_kv_blocks][1:]).all()

"""Quantized models of every supported architecture load and run through the whole engine.

The reference is transformers in float32 with each weight replaced by what the quantized
format stands for (dequantized): the engine's greedy tokens must match it, with chunked
prefill, prefix-cache hits and preemption in play. Integer kernels that quantize activations
may flip near-ties, so, as the bfloat16 parity tests do, at a first divergence each side's
token must be in the other's top 5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fitserve import LLM
from fitserve.engine.runner import kv_cache_bytes_per_block
from fitserve.models.config import ModelLoadError, load_model_config
from fitserve.models.loader import linear_layouts, load_model
from fitserve.quant.quantize import QuantizeError, quantize_model
from tests.engine.test_parity import greedy, hf_greedy
from tests.quant.reference import dequantized_transformers_model
from tests.tiny_models import VARIANTS, random_token_ids, write_tiny_checkpoint

CPU = torch.device("cpu")
GROUP = 32


def quantize_tiny(tmp_path: Path, variant: str, method: str) -> tuple[Path, Path]:
    dense = write_tiny_checkpoint(tmp_path / "dense", variant)
    options = {}
    if method == "mixllm":  # every third row of each matrix in 8 bits (no tokenizer to calibrate with)
        config = json.loads((dense / "config.json").read_text())
        layouts = linear_layouts(load_model_config(dense))
        options["high_channels"] = {part.prefix: list(range(0, part.rows, 3))
                                    for layout in layouts for part in layout.parts if layout.module_name != "lm_head"}
        assert config["hidden_size"] % GROUP == 0
    quantized = tmp_path / method
    quantize_model(dense, quantized, method, group_size=GROUP, progress=False, **options)
    return dense, quantized


def dequantized_reference(dense: Path, quantized: Path):
    return dequantized_transformers_model(dense, quantized)


def assert_tokens_match(ours: list[int], reference: list[int], reference_logits: list[torch.Tensor]) -> None:
    for step, (mine, theirs) in enumerate(zip(ours, reference, strict=True)):
        if mine != theirs:
            top5 = reference_logits[step].topk(5).indices.tolist()
            assert mine in top5, f"step {step}: fitserve chose {mine}, not in the reference's top 5 {top5}"
            return


@pytest.mark.parametrize("method", ["w8", "w4", "mixllm"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_quantized_engine_matches_transformers_on_dequantized_weights(tmp_path: Path, variant: str,
                                                                      method: str) -> None:
    dense, quantized = quantize_tiny(tmp_path, variant, method)
    reference = dequantized_reference(dense, quantized)
    shared = random_token_ids(24, seed=99)
    prompts = [random_token_ids(5, seed=1), shared + random_token_ids(30, seed=2),
               shared + random_token_ids(9, seed=3), random_token_ids(70, seed=4)]
    # 32-token steps chunk the long prompts; the shared 24-token prefix hits the prefix cache;
    # 14 blocks (112 tokens) cannot hold all four requests (~20 blocks), so some are preempted.
    config = load_model_config(dense)
    block_bytes = kv_cache_bytes_per_block(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                                           8, torch.float32)
    llm = LLM(str(quantized), dtype="float32", kv_cache_memory=14 * block_bytes, block_size=8,
              max_num_batched_tokens=32)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens=10))
    for prompt, output in zip(prompts, outputs, strict=True):
        expected, logits = hf_greedy(reference, prompt, 10)
        assert_tokens_match(output.outputs[0].token_ids, expected, logits)
    stats = llm.engine.get_stats()
    assert stats.num_preemptions_total > 0 and stats.num_prefix_cache_hit_tokens_total > 0


def test_loading_a_prequantized_directory_equals_quantizing_at_load(tmp_path: Path) -> None:
    dense, quantized = quantize_tiny(tmp_path, "qwen2_bias", "w4")
    from_dir, _ = load_model(quantized, torch.float32, CPU, "torch")
    at_load, _ = load_model(dense, torch.float32, CPU, "torch", quantization="w4", group_size=GROUP)
    for name, tensor in from_dir.state_dict().items():
        assert torch.equal(tensor, at_load.state_dict()[name]), name


def test_quantized_directory_whose_tensors_do_not_match_its_config_is_refused(tmp_path: Path) -> None:
    _, quantized = quantize_tiny(tmp_path, "llama2", "w4")
    tensors = load_file(str(quantized / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.scales"
    tensors[name] = tensors[name].float()  # wrong dtype
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="down_proj.scales.*quantization_config"):
        load_model(quantized, torch.float32, CPU, "torch")
    config = json.loads((quantized / "config.json").read_text())
    written = dict(config["quantization_config"])
    config["quantization_config"]["group_size"] = 64  # shapes no longer match
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="shape"):
        load_model(quantized, torch.float32, CPU, "torch")
    config["quantization_config"]["quant_method"] = "gptq"
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="gptq.*not supported"):
        load_model(quantized, torch.float32, CPU, "torch")
    config["quantization_config"] = {**written, "bits": 3}  # w4 weights
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="bits is 3, but method 'w4' stores 4-bit weights"):
        load_model(quantized, torch.float32, CPU, "torch")


def test_quantize_refuses_bad_requests_with_one_line_errors(tmp_path: Path) -> None:
    dense = write_tiny_checkpoint(tmp_path / "dense", "llama2")
    with pytest.raises(QuantizeError, match="unknown method"):
        quantize_model(dense, tmp_path / "out", "int3", progress=False)
    with pytest.raises(QuantizeError, match="does not divide.*--group-size 64"):
        quantize_model(dense, tmp_path / "out", "w4", group_size=96, progress=False)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(QuantizeError, match="already exists.*--force"):
        quantize_model(dense, tmp_path / "taken", "w8", progress=False)
    quantize_model(dense, tmp_path / "taken", "w8", force=True, progress=False)
    assert (tmp_path / "taken" / "model.safetensors").is_file() and not (tmp_path / "taken" / "file").exists()
    with pytest.raises(QuantizeError, match="already quantized"):
        quantize_model(tmp_path / "taken", tmp_path / "again", "w4", progress=False)


def test_dynamic_quantization_with_a_group_that_does_not_divide_is_refused(tmp_path: Path) -> None:
    dense = write_tiny_checkpoint(tmp_path / "dense", "llama2")
    with pytest.raises(ModelLoadError, match="does not divide"):
        load_model(dense, torch.float32, CPU, "torch", quantization="w4", group_size=48)


def test_triton_path_runs_quantized_models(tmp_path: Path, monkeypatch) -> None:
    """The GPU path (Triton's interpreter here): attention and the dequantizing matmuls in
    Triton. A mixllm model exercises both kernels (w4 rows, w8 rows and the w8 LM head)."""
    method = "mixllm"
    from fitserve.kernels import triton_quant

    dense, quantized = quantize_tiny(tmp_path, "llama3_rope_scaling", method)
    reference = dequantized_reference(dense, quantized)
    calls = {"w4": 0, "w8": 0}
    for kind in calls:
        original = getattr(triton_quant, f"{kind}_linear")

        def counted(*args, _original=original, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(triton_quant, f"{kind}_linear", counted)
    llm = LLM(str(quantized), dtype="float32", kv_cache_memory="1MiB", block_size=8, max_num_batched_tokens=32,
              attention_backend="triton")
    prompts = [random_token_ids(5, seed=1), random_token_ids(40, seed=2)]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy(max_tokens=4))
    for prompt, output in zip(prompts, outputs, strict=True):
        expected, logits = hf_greedy(reference, prompt, 4)
        assert_tokens_match(output.outputs[0].token_ids, expected, logits)
    assert calls["w4"] > 0 and calls["w8"] > 0  # projections in w4, the LM head (and mixllm rows) in w8


@pytest.mark.parametrize("method,dtype", [("w4", "float32"), ("mixllm", "bfloat16"), ("w8", "bfloat16")])
def test_fused_decode_stack_runs_quantized_models_bit_identically(tmp_path: Path, method: str, dtype: str) -> None:
    """The fused C++ decode stack takes the same QuantLinear objects as the Python path, so
    switching between the two never changes a token."""
    _, quantized = quantize_tiny(tmp_path, "qwen3_qk_norm", method)
    prompts = [{"prompt_token_ids": random_token_ids(n, seed=n)} for n in (3, 20, 37)]
    tokens = []
    for fused in (True, False):
        llm = LLM(str(quantized), dtype=dtype, kv_cache_memory="1MiB", block_size=8)
        llm.engine.model.fused_cpu_decode.enabled = fused
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy(max_tokens=12))])
        if fused:
            assert llm.engine.model.fused_cpu_decode._stack is not None, "the fused stack declined the model"
    assert tokens[0] == tokens[1]


def test_quantized_weights_with_an_int8_kv_cache(tmp_path: Path) -> None:
    """Both compressions at once: w4/w8 weights over an int8 cache, fused stack and Python path
    agreeing token for token, chunked prefill and prefix hits included."""
    _, quantized = quantize_tiny(tmp_path, "qwen2_bias", "mixllm")
    shared = random_token_ids(24, seed=7)
    prompts = [{"prompt_token_ids": shared + random_token_ids(n, seed=n)} for n in (3, 30)]
    tokens = []
    for fused in (True, False):
        llm = LLM(str(quantized), dtype="float32", kv_cache_memory="1MiB", block_size=8, max_num_batched_tokens=16,
                  kv_cache_dtype="int8")
        llm.engine.model.fused_cpu_decode.enabled = fused
        tokens.append([o.outputs[0].token_ids for o in llm.generate(prompts, greedy(max_tokens=10))])
        if fused:
            assert llm.engine.model.fused_cpu_decode._stack is not None
        assert llm.engine.get_stats().num_prefix_cache_hit_tokens_total > 0
    assert tokens[0] == tokens[1]

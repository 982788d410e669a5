"""Checkpoints load the way users store them: tied or not, sharded, in half precision,
with rope settings spelled the transformers 4 or the transformers 5 way."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from fitserve.config import resolve_dtype
from fitserve.models.config import load_model_config
from fitserve.models.loader import load_model

CPU = torch.device("cpu")


def prefill_logits(model, config, paged_cache_for, prompt):
    cache = paged_cache_for(config, dtype=model.lm_head.weight.dtype)
    sequence = cache.new_sequence(prompt)
    input_ids, positions, metadata = cache.step([(sequence, len(prompt))])
    with torch.no_grad():
        return model.compute_logits(model(input_ids, positions, cache.kv_caches, metadata))


def hf_logits(checkpoint, prompt, dtype=torch.float32):
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
    with torch.no_grad():
        return hf_model(torch.tensor([prompt])).logits[0].float()


def test_tied_embeddings_share_one_matrix(make_checkpoint, paged_cache_for, token_ids):
    checkpoint = make_checkpoint("qwen2_bias", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(checkpoint / "model.safetensors")
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    assert config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    prompt = token_ids(10, 6)
    torch.testing.assert_close(
        prefill_logits(model, config, paged_cache_for, prompt), hf_logits(checkpoint, prompt),
        atol=1e-4, rtol=1e-4,
    )


def test_untied_embeddings_use_the_checkpoint_lm_head(make_checkpoint, paged_cache_for, token_ids):
    checkpoint = make_checkpoint("qwen2_bias", tie_word_embeddings=False)
    stored = load_file(checkpoint / "model.safetensors")
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    assert not config.tie_word_embeddings
    assert torch.equal(model.lm_head.weight, stored["lm_head.weight"])
    assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    prompt = token_ids(10, 7)
    torch.testing.assert_close(
        prefill_logits(model, config, paged_cache_for, prompt), hf_logits(checkpoint, prompt),
        atol=1e-4, rtol=1e-4,
    )


def test_fused_weights_hold_the_checkpoint_tensors(make_checkpoint):
    checkpoint = make_checkpoint("qwen3_qk_norm")
    stored = load_file(checkpoint / "model.safetensors")
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    attention = model.model.layers[1].self_attn
    expected_qkv = torch.cat([stored[f"model.layers.1.self_attn.{name}.weight"] for name in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attention.qkv_proj.weight, expected_qkv)
    assert torch.equal(attention.k_norm.weight, stored["model.layers.1.self_attn.k_norm.weight"])
    mlp = model.model.layers[1].mlp
    expected_gate_up = torch.cat([stored[f"model.layers.1.mlp.{name}.weight"] for name in ("gate_proj", "up_proj")])
    assert torch.equal(mlp.gate_up_proj.weight, expected_gate_up)


def test_sharded_checkpoint_loads_identically(make_checkpoint, tmp_path):
    checkpoint = make_checkpoint("llama2")
    tensors = load_file(checkpoint / "model.safetensors")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((checkpoint / "config.json").read_text())
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file_name, shard_names in shards.items():
        save_file({name: tensors[name] for name in shard_names}, str(sharded / file_name))
        weight_map.update({name: file_name for name in shard_names})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    whole_model, _ = load_model(checkpoint, torch.float32, CPU, "torch")
    sharded_model, _ = load_model(sharded, torch.float32, CPU, "torch")
    whole_state = whole_model.state_dict()
    sharded_state = sharded_model.state_dict()
    assert whole_state.keys() == sharded_state.keys()
    for name, value in whole_state.items():
        assert torch.equal(value, sharded_state[name]), name


@pytest.mark.parametrize(
    ("dtype_name", "dtype", "cpu_auto_dtype"),
    [("bfloat16", torch.bfloat16, torch.bfloat16), ("float16", torch.float16, torch.bfloat16)],
)
def test_half_precision_checkpoints_load(
    dtype_name, dtype, cpu_auto_dtype, make_checkpoint, paged_cache_for, token_ids
):
    checkpoint = make_checkpoint("llama3_rope_scaling", dtype=dtype_name)
    config = load_model_config(checkpoint)
    assert config.checkpoint_dtype == dtype
    # "auto" follows the checkpoint, except that float16 runs as bfloat16 on CPU (fast there).
    assert resolve_dtype("auto", config.checkpoint_dtype, torch.device("cuda")) == dtype
    assert resolve_dtype("auto", config.checkpoint_dtype, CPU) == cpu_auto_dtype

    model, _ = load_model(checkpoint, cpu_auto_dtype, CPU, "torch")
    assert {parameter.dtype for parameter in model.parameters()} == {cpu_auto_dtype}
    assert model.rotary_emb.inv_freq.dtype == torch.float32  # rope angles stay exact
    prompt = token_ids(10, 8)
    logits = prefill_logits(model, config, paged_cache_for, prompt)
    expected = hf_logits(checkpoint, prompt, dtype=cpu_auto_dtype)
    assert logits.dtype == cpu_auto_dtype  # as the lm_head rounds them; the sampler widens
    # bfloat16 keeps ~3 significant digits; both sides round the same weights the same way.
    torch.testing.assert_close(logits.float(), expected, atol=5e-2, rtol=5e-2)


def test_checkpoint_dtype_falls_back_to_the_weights(make_checkpoint):
    checkpoint = make_checkpoint("mistral", dtype="bfloat16")
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.pop("torch_dtype")
    (checkpoint / "config.json").write_text(json.dumps(raw))
    assert load_model_config(checkpoint).checkpoint_dtype == torch.bfloat16


def test_transformers5_rope_parameters_spelling(make_checkpoint, paged_cache_for, token_ids):
    """transformers 5 writes one `rope_parameters` dict (theta included); read it like the old
    `rope_theta` + `rope_scaling` pair, here with linear scaling."""
    checkpoint = make_checkpoint("llama2")
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.pop("rope_theta")
    raw.pop("rope_scaling", None)
    raw["rope_parameters"] = {"rope_type": "linear", "factor": 4.0, "rope_theta": 50000.0}
    (checkpoint / "config.json").write_text(json.dumps(raw))

    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    assert config.rope_theta == 50000.0
    assert config.rope_scaling == {"rope_type": "linear", "factor": 4.0}
    prompt = token_ids(12, 9)
    torch.testing.assert_close(
        prefill_logits(model, config, paged_cache_for, prompt), hf_logits(checkpoint, prompt),
        atol=1e-4, rtol=1e-4,
    )


def test_legacy_rope_scaling_type_key_and_generation_config_eos(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    raw = json.loads((checkpoint / "config.json").read_text())
    raw["rope_scaling"] = {"type": "linear", "factor": 2.0}
    raw["eos_token_id"] = 2
    (checkpoint / "config.json").write_text(json.dumps(raw))
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    config = load_model_config(checkpoint)
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert config.eos_token_ids == [2, 7, 9]
    assert config.bos_token_id == 1


def test_architecture_switches_come_from_config(make_checkpoint):
    qwen2 = load_model_config(make_checkpoint("qwen2_bias"))
    assert (qwen2.architecture, qwen2.attention_bias, qwen2.qk_norm) == ("Qwen2ForCausalLM", True, False)
    qwen3 = load_model_config(make_checkpoint("qwen3_qk_norm"))
    assert (qwen3.attention_bias, qwen3.qk_norm, qwen3.head_dim) == (False, True, 32)
    llama = load_model_config(make_checkpoint("llama3_rope_scaling"))
    assert llama.rope_scaling is not None and llama.rope_scaling["rope_type"] == "llama3"
    assert (llama.num_attention_heads, llama.num_key_value_heads) == (4, 2)


def test_model_type_identifies_the_architecture_when_architectures_is_absent(make_checkpoint):
    checkpoint = make_checkpoint("qwen3_qk_norm")
    raw = json.loads((checkpoint / "config.json").read_text())
    raw.pop("architectures")
    (checkpoint / "config.json").write_text(json.dumps(raw))
    assert load_model_config(checkpoint).architecture == "Qwen3ForCausalLM"


def test_dynamic_rope_equals_transformers_within_the_trained_length(make_checkpoint, paged_cache_for, token_ids):
    checkpoint = make_checkpoint("llama2", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    assert config.rope_scaling == {"rope_type": "dynamic", "factor": 2.0}
    prompt = token_ids(12, 10)
    torch.testing.assert_close(
        prefill_logits(model, config, paged_cache_for, prompt), hf_logits(checkpoint, prompt),
        atol=1e-4, rtol=1e-4,
    )

"""A model directory that cannot be served fails with one ModelLoadError naming the problem."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from fitserve.models.config import ModelLoadError, load_model_config
from fitserve.models.loader import load_model

CPU = torch.device("cpu")


def load(model_dir):
    return load_model(model_dir, torch.float32, CPU, "torch")


def edit_config(model_dir, **changes):
    raw = json.loads((model_dir / "config.json").read_text())
    raw.update(changes)
    (model_dir / "config.json").write_text(json.dumps(raw))


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "no-such-model")


def test_no_config_json(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load(tmp_path)


def test_broken_config_json(tmp_path):
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        load(tmp_path)


def test_unsupported_architecture_lists_the_supported_ones(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    edit_config(checkpoint, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError) as error:
        load(checkpoint)
    message = str(error.value)
    assert "GPT2LMHeadModel" in message and "not supported" in message
    for supported in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert supported in message


def test_unknown_rope_type_is_rejected(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    edit_config(checkpoint, rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ModelLoadError, match="rope type 'yarn' is not supported"):
        load(checkpoint)


def test_no_safetensors_weights(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    (checkpoint / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no weights \(\*\.safetensors\).*\.bin.*convert"):
        load(checkpoint)


def test_bin_only_checkpoint_says_to_convert(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    (checkpoint / "model.safetensors").unlink()
    (checkpoint / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ModelLoadError, match="PyTorch .bin weights: convert them to safetensors"):
        load(checkpoint)


def test_missing_weight_is_named(make_checkpoint):
    checkpoint = make_checkpoint("qwen2_bias")
    tensors = load_file(checkpoint / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"'model\.layers\.1\.self_attn\.k_proj\.bias'.*missing"):
        load(checkpoint)


def test_unexpected_weight_is_named(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.0.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"unexpected weight 'model\.layers\.0\.mlp\.extra_proj\.weight'"):
        load(checkpoint)


def test_rotary_inv_freq_buffers_are_ignored(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    tensors = load_file(checkpoint / "model.safetensors")
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(checkpoint / "model.safetensors"))
    model, _ = load(checkpoint)
    assert not torch.equal(model.rotary_emb.inv_freq, torch.ones(8))


def test_shape_mismatch_names_tensor_and_both_shapes(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    edit_config(checkpoint, intermediate_size=96)  # the weights were written for 128
    with pytest.raises(ModelLoadError) as error:
        load(checkpoint)
    message = str(error.value)
    assert "model.layers.0.mlp.gate_proj.weight" in message
    assert "[128, 64]" in message and "[96, 64]" in message


def test_index_naming_a_missing_shard(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    weight_map = {name: "model-00002-of-00002.safetensors" for name in load_file(checkpoint / "model.safetensors")}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        load(checkpoint)


def test_heads_not_divisible_by_kv_heads(make_checkpoint):
    checkpoint = make_checkpoint("llama2")
    edit_config(checkpoint, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="multiple of num_key_value_heads"):
        load_model_config(checkpoint)

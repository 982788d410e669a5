"""Random checkpoints carry the real models' architecture and load in fitserve and transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

from fitserve.models.config import load_model_config
from fitserve.models.random_checkpoint import PRESETS, main, resolve_preset, write_random_checkpoint


def write_config_only(directory, preset):
    """The preset's config.json alone: enough to check its parsed architecture, no weights."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(resolve_preset(preset, None) | {"torch_dtype": "bfloat16"}))
    return load_model_config(directory)


@pytest.mark.parametrize(
    ("preset", "expected"),
    [
        ("qwen2.5-0.5b", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                              num_key_value_heads=2, head_dim=64, vocab_size=151936, rope_theta=1e6,
                              tie_word_embeddings=True, attention_bias=True, qk_norm=False)),
        ("llama-3.2-1b", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=5e5,
                              tie_word_embeddings=True, rms_norm_eps=1e-5)),
        ("llama-3-8b", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, vocab_size=128256, rope_theta=5e5, tie_word_embeddings=False,
                            rope_scaling=None)),
        ("qwen3-0.6b", dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                            num_key_value_heads=8, head_dim=128, vocab_size=151936, rope_theta=1e6,
                            tie_word_embeddings=True, qk_norm=True, attention_bias=False)),
        ("mistral-7b", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_key_value_heads=8,
                            vocab_size=32768, rope_theta=1e6, tie_word_embeddings=False, sliding_window=None)),
    ],
)
def test_presets_have_the_real_architectures(preset, expected, tmp_path):
    config = write_config_only(tmp_path / preset, preset)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    assert config.checkpoint_dtype == torch.bfloat16
    # transformers reads the same file the same way.
    hf_config = AutoConfig.from_pretrained(tmp_path / preset)
    assert hf_config.num_hidden_layers == config.num_hidden_layers
    assert getattr(hf_config, "head_dim", None) in (None, config.head_dim)


def test_llama_3_2_preset_uses_llama3_rope_scaling(tmp_path):
    config = write_config_only(tmp_path / "llama", "llama-3.2-1b")
    assert config.rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }


def test_written_weights_are_seeded_and_sane(tmp_path):
    overrides = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=100)
    first = write_random_checkpoint(tmp_path / "a", "qwen3-0.6b", dtype="bfloat16", seed=3, overrides=overrides)
    second = write_random_checkpoint(tmp_path / "b", "qwen3-0.6b", dtype="bfloat16", seed=3, overrides=overrides)
    with safe_open(str(first / "model.safetensors"), "pt") as a, safe_open(str(second / "model.safetensors"), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        for name in a.keys():
            assert torch.equal(a.get_tensor(name), b.get_tensor(name)), name
        embedding = a.get_tensor("model.embed_tokens.weight")
        assert embedding.dtype == torch.bfloat16 and embedding.shape == (100, 32)
        assert 0.01 < embedding.float().std() < 0.03
        norm = a.get_tensor("model.layers.0.self_attn.q_norm.weight").float()
        assert norm.shape == (128,) and (norm - 1).abs().max() < 0.2


def test_tokenizer_files_are_copied(tmp_path):
    tokenizer_dir = tmp_path / "tok"
    tokenizer_dir.mkdir()
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    (tokenizer_dir / "tokenizer_config.json").write_text("{}")
    out = write_random_checkpoint(
        tmp_path / "ckpt", "llama-3-8b", dtype="float32", tokenizer_dir=str(tokenizer_dir),
        overrides=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, vocab_size=50),
    )
    assert (out / "tokenizer.json").read_text() == "{}"
    assert (out / "tokenizer_config.json").is_file()


def test_command_line_writes_a_loadable_checkpoint(tmp_path, capsys, monkeypatch):
    # Shrink the preset's vocabulary and width so the command stays cheap in a test.
    small = resolve_preset("mistral-7b", dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                                num_key_value_heads=1, head_dim=16, vocab_size=64))
    monkeypatch.setitem(PRESETS, "mistral-7b", small)
    main(["mistral-7b", str(tmp_path / "cli"), "--dtype", "float16", "--num-layers", "2"])
    config = load_model_config(tmp_path / "cli")
    assert config.num_hidden_layers == 2 and config.checkpoint_dtype == torch.float16
    assert "wrote" in capsys.readouterr().out


def test_unknown_preset_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="llama-3.2-1b"):
        write_random_checkpoint(tmp_path, "gpt-5")

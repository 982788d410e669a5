"""What fitserve needs to know about a checkpoint, read from its config.json.

Hugging Face configs of the Llama family differ in small ways (Qwen2 always has q/k/v bias,
Qwen3 normalises q and k per head, Mistral may have a sliding window, transformers 5 moves
rope settings into `rope_parameters`). This module folds those differences into one flat
`ModelConfig`, so the model code never looks at a raw config dict. Every problem found here
raises `ModelLoadError` with a message that names the problem and the fix, because model
directories are user input and validated at the edge.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


class ModelLoadError(Exception):
    """A model directory cannot be loaded; the message names the problem and the fix."""


SUPPORTED_ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
)

# Some configs omit `architectures`; their model_type still identifies the decoder.
_ARCHITECTURE_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "dynamic")

_CONFIG_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "half": torch.float16,
}

_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


@dataclass
class ModelConfig:
    """The architecture of one checkpoint, normalised across Llama, Mistral, Qwen2 and Qwen3."""

    architecture: str
    """One of SUPPORTED_ARCHITECTURES, from config.json `architectures`."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    """Width of the SiLU-gated MLP."""
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    """Fewer than num_attention_heads means grouped-query attention."""
    head_dim: int
    """Explicit in Qwen3 and some Mistral configs, where it is not hidden_size / heads."""
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    """None for plain rope; else a dict with `rope_type` ("linear", "llama3" or "dynamic") and
    its factors. Dynamic NTK scaling only changes rope past max_position_embeddings, where
    transformers' result depends on the batch it ran in; within that length it is plain rope,
    which is what fitserve computes (keep max_model_len <= max_position_embeddings)."""
    max_position_embeddings: int
    tie_word_embeddings: bool
    """The output projection reuses the input embedding matrix."""
    attention_bias: bool
    """q/k/v projections have a bias (always for Qwen2)."""
    qk_norm: bool
    """Qwen3: RMSNorm over each head of q and k before rope."""
    bos_token_id: int | None
    eos_token_ids: list[int]
    """Every token that ends generation, from config.json and generation_config.json."""
    checkpoint_dtype: torch.dtype
    """The dtype the weights are stored in; `dtype="auto"` follows it."""
    attention_output_bias: bool = False
    """o_proj has a bias (Llama configs with attention_bias set it on o_proj too)."""
    mlp_bias: bool = False
    """gate/up/down projections have a bias (Llama `mlp_bias`)."""
    sliding_window: int | None = None
    """Mistral/Qwen sliding-window size. The paged attention backends attend to the whole
    context, so outputs match transformers only while sequences stay within this window."""
    extra: dict[str, Any] = field(default_factory=dict, repr=False)
    """The raw config.json, for callers that need a field not modelled here."""

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except json.JSONDecodeError as error:
        raise ModelLoadError(
            f"{what} {path} is not valid JSON ({error}); re-download or fix the file"
        ) from error
    if not isinstance(data, dict):
        raise ModelLoadError(f"{what} {path} must hold a JSON object, found {type(data).__name__}")
    return data


def _require(raw: dict[str, Any], key: str, config_path: Path) -> Any:
    if raw.get(key) is None:
        raise ModelLoadError(
            f"{config_path} has no {key!r}; it is required for {raw.get('architectures')} models"
        )
    return raw[key]


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(token) for token in value]


def _rope_settings(raw: dict[str, Any], config_path: Path) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling) from either spelling: transformers 4 or 5.

    transformers 4 configs keep `rope_theta` at the top level and an optional `rope_scaling`
    dict (whose type key is `type` in old files, `rope_type` in newer ones); transformers 5
    writes one `rope_parameters` dict holding the theta too.
    """
    parameters = dict(raw.get("rope_parameters") or {})
    parameters.update(raw.get("rope_scaling") or {})
    rope_theta = float(parameters.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0)
    rope_type = parameters.pop("rope_type", None) or parameters.pop("type", None) or "default"
    parameters.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"{config_path}: rope type {rope_type!r} is not supported; fitserve supports "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    partial_rotary_factor = parameters.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    if partial_rotary_factor != 1.0:
        raise ModelLoadError(
            f"{config_path}: partial_rotary_factor {partial_rotary_factor} is not supported; "
            "fitserve applies rope to the whole head"
        )
    if rope_type == "default":
        return rope_theta, None
    if "factor" not in parameters:
        raise ModelLoadError(f"{config_path}: rope type {rope_type!r} needs a 'factor'")
    scaling: dict[str, Any] = {"rope_type": rope_type, "factor": float(parameters["factor"])}
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            if key not in parameters:
                raise ModelLoadError(f"{config_path}: rope type 'llama3' needs {key!r}")
            scaling[key] = float(parameters[key])
        # transformers falls back to max_position_embeddings when the original length is absent.
        scaling["original_max_position_embeddings"] = int(
            parameters.get("original_max_position_embeddings")
            or raw.get("original_max_position_embeddings")
            or raw.get("max_position_embeddings", 2048)
        )
    return rope_theta, scaling


def _checkpoint_dtype(raw: dict[str, Any], model_dir: Path) -> torch.dtype:
    """The stored dtype: config.json says it (`dtype` in transformers 5, `torch_dtype` before);
    if it does not, the first safetensors header does."""
    name = raw.get("dtype") or raw.get("torch_dtype")
    if isinstance(name, str) and name in _CONFIG_DTYPES:
        return _CONFIG_DTYPES[name]
    for path in sorted(model_dir.glob("*.safetensors")):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as file:
            for key in file.keys():
                stored = file.get_slice(key).get_dtype()
                if stored in _SAFETENSORS_DTYPES:
                    return _SAFETENSORS_DTYPES[stored]
    return torch.float32


def load_model_config(model_dir: str | Path) -> ModelConfig:
    """Read and validate `model_dir/config.json` (and generation_config.json if present)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        problem = "is a file, not a directory" if model_dir.exists() else "does not exist"
        raise ModelLoadError(
            f"model directory {model_dir} {problem}; pass a local Hugging Face model "
            "directory (with config.json and *.safetensors)"
        )
    config_path = model_dir / "config.json"
    if not config_path.is_file():
        raise ModelLoadError(
            f"{model_dir} has no config.json; pass the directory of a Hugging Face checkpoint"
        )
    raw = _read_json(config_path, "config file")

    architectures = raw.get("architectures") or []
    if not architectures and raw.get("model_type") in _ARCHITECTURE_BY_MODEL_TYPE:
        architectures = [_ARCHITECTURE_BY_MODEL_TYPE[raw["model_type"]]]
    architecture = next((name for name in architectures if name in SUPPORTED_ARCHITECTURES), None)
    if architecture is None:
        raise ModelLoadError(
            f"{config_path}: architecture {architectures or raw.get('model_type')} is not "
            f"supported; fitserve supports {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    hidden_act = raw.get("hidden_act", "silu")
    if hidden_act != "silu":
        raise ModelLoadError(f"{config_path}: hidden_act {hidden_act!r} is not supported (only silu)")

    hidden_size = int(_require(raw, "hidden_size", config_path))
    num_attention_heads = int(_require(raw, "num_attention_heads", config_path))
    num_key_value_heads = int(raw.get("num_key_value_heads") or num_attention_heads)
    if num_attention_heads % num_key_value_heads:
        raise ModelLoadError(
            f"{config_path}: num_attention_heads ({num_attention_heads}) must be a multiple of "
            f"num_key_value_heads ({num_key_value_heads})"
        )
    is_qwen2 = architecture == "Qwen2ForCausalLM"
    is_qwen3 = architecture == "Qwen3ForCausalLM"
    # Qwen3's config class defaults head_dim to 128; the others derive it from the width.
    default_head_dim = 128 if is_qwen3 else hidden_size // num_attention_heads
    head_dim = int(raw.get("head_dim") or default_head_dim)
    rope_theta, rope_scaling = _rope_settings(raw, config_path)

    attention_bias = bool(raw.get("attention_bias", False))
    if is_qwen2:
        qkv_bias, output_bias = True, False  # hard-wired in Qwen2, whatever the config says
    elif architecture == "MistralForCausalLM":
        qkv_bias = output_bias = False
    else:
        qkv_bias = output_bias = attention_bias

    sliding_window = raw.get("sliding_window")
    if architecture != "MistralForCausalLM" and not raw.get("use_sliding_window", False):
        sliding_window = None

    eos_token_ids = _token_ids(raw.get("eos_token_id"))
    generation_config_path = model_dir / "generation_config.json"
    if generation_config_path.is_file():
        generation = _read_json(generation_config_path, "generation config")
        eos_token_ids += [
            token for token in _token_ids(generation.get("eos_token_id")) if token not in eos_token_ids
        ]

    return ModelConfig(
        architecture=architecture,
        vocab_size=int(_require(raw, "vocab_size", config_path)),
        hidden_size=hidden_size,
        intermediate_size=int(_require(raw, "intermediate_size", config_path)),
        num_hidden_layers=int(_require(raw, "num_hidden_layers", config_path)),
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        attention_bias=qkv_bias,
        qk_norm=is_qwen3,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_token_ids,
        checkpoint_dtype=_checkpoint_dtype(raw, model_dir),
        attention_output_bias=output_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)) if architecture == "LlamaForCausalLM" else False,
        sliding_window=int(sliding_window) if sliding_window else None,
        extra=raw,
    )

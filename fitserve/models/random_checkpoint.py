"""Random-weight checkpoints with the exact shapes of real models.

Speed work needs the real shapes (memory traffic is what decode time is made of) but not
the real weights, which cannot be downloaded here. The files written are ordinary Hugging
Face checkpoints (config.json + model.safetensors) that both transformers and fitserve load,
so they also serve as test fixtures.

Tensors are generated and written one at a time (large ones in row chunks) straight into
the safetensors file, so writing a 1B model never holds more than one chunk in memory.

    python -m fitserve.models.random_checkpoint llama-3.2-1b /tmp/llama1b --num-layers 4
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fitserve.models.config import load_model_config
from fitserve.models.loader import expected_checkpoint_tensors

# Values from each model's published config.json (transformers 4 spelling, as on the Hub).
PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "vocab_size": 151936, "hidden_size": 896, "intermediate_size": 4864,
        "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
        "max_position_embeddings": 32768, "rope_theta": 1000000.0, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": 32768,
        "max_window_layers": 24, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151643,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3",
        },
        "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "llama-3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "max_position_embeddings": 8192, "rope_theta": 500000.0, "rope_scaling": None,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
    },
    "qwen3-0.6b": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 40960, "rope_theta": 1000000.0,
        "rope_scaling": None, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "attention_bias": False, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": 28, "hidden_act": "silu",
        "bos_token_id": 151643, "eos_token_id": 151645,
    },
    "mistral-7b": {  # Mistral-7B-v0.3
        "architectures": ["MistralForCausalLM"], "model_type": "mistral",
        "vocab_size": 32768, "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 128, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
        "sliding_window": None, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
    },
}

_SAFETENSORS_DTYPE_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPES_BY_NAME = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "generation_config.json", "chat_template.jinja",
)
# Rows generated per chunk: keeps a 151936 x 4096 embedding from needing a float32 copy.
_CHUNK_ELEMENTS = 1 << 24


def _write_safetensors_streaming(
    path: Path,
    shapes: dict[str, tuple[int, ...]],
    dtype: torch.dtype,
    fill: Callable[[str, tuple[int, ...], int, int], torch.Tensor],
) -> None:
    """Write a safetensors file whose tensors are produced row-chunk by row-chunk by `fill`.

    The format is an 8-byte little-endian header length, a JSON header with each tensor's
    byte range, then the raw bytes; writing it directly lets data stream to disk.
    """
    element_size = torch.empty((), dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in shapes.items():
        size = element_size * int(torch.Size(shape).numel())
        header[name] = {
            "dtype": _SAFETENSORS_DTYPE_NAMES[dtype], "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    header_bytes += b" " * (-len(header_bytes) % 8)  # data must start 8-byte aligned
    with open(path, "wb") as file:
        file.write(struct.pack("<Q", len(header_bytes)))
        file.write(header_bytes)
        for name, shape in shapes.items():
            row_elements = int(torch.Size(shape[1:]).numel())
            rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(1, row_elements))
            for row_start in range(0, shape[0], rows_per_chunk):
                row_end = min(shape[0], row_start + rows_per_chunk)
                chunk = fill(name, shape, row_start, row_end).to(dtype).contiguous()
                file.write(chunk.view(torch.uint8).numpy().tobytes())


def resolve_preset(preset_or_config: str | dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """A full HF config dict from a preset name or a dict, with `overrides` applied on top."""
    if isinstance(preset_or_config, str):
        if preset_or_config not in PRESETS:
            raise ValueError(
                f"unknown preset {preset_or_config!r}; choose one of {', '.join(PRESETS)}"
            )
        config = copy.deepcopy(PRESETS[preset_or_config])
    else:
        config = copy.deepcopy(preset_or_config)
    config.update(overrides or {})
    return config


def write_random_checkpoint(
    out_dir: str | Path,
    preset_or_config: str | dict[str, Any],
    dtype: str = "bfloat16",
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    tokenizer_dir: str | None = None,
    init_std: float = 0.02,
) -> Path:
    """Write config.json + model.safetensors with seeded random weights; return `out_dir`.

    Matrices and biases are N(0, init_std); norm weights are 1 + N(0, init_std) rather than
    exactly 1, so a loader that swaps two norms is caught by tests while activations stay
    at the scale real models have.
    """
    if dtype not in _DTYPES_BY_NAME:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES_BY_NAME)} (got {dtype!r})")
    torch_dtype = _DTYPES_BY_NAME[dtype]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = resolve_preset(preset_or_config, overrides)
    config["torch_dtype"] = dtype  # transformers 4 name; transformers 5 reads it too
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

    model_config = load_model_config(out_dir)
    shapes = {name: target.shape for name, target in expected_checkpoint_tensors(model_config).items()}
    generator = torch.Generator().manual_seed(seed)

    def fill(name: str, shape: tuple[int, ...], row_start: int, row_end: int) -> torch.Tensor:
        values = torch.randn((row_end - row_start, *shape[1:]), generator=generator) * init_std
        return values + 1.0 if name.endswith("norm.weight") else values

    _write_safetensors_streaming(out_dir / "model.safetensors", shapes, torch_dtype, fill)

    if tokenizer_dir is not None:
        for file_name in _TOKENIZER_FILES:
            source = Path(tokenizer_dir) / file_name
            if source.is_file():
                shutil.copy2(source, out_dir / file_name)
    return out_dir


def write_random_bitstack_checkpoint(out_dir: str | Path, preset_or_config: str | dict[str, Any], num_blocks: int,
                                     rank: int, overrides: dict[str, Any] | None = None, seed: int = 0) -> Path:
    """A BitStack checkpoint (fitserve.quant.bitstack_packing's layout; LM head / tied
    embedding in w8) of random tensors with a real model's shapes: every matrix `num_blocks`
    blocks of rank `rank`, in a level-wise block order. No decomposition, so it is written in
    seconds at the sizes where memory and resize times are measured; its outputs mean nothing."""
    from safetensors.torch import save_file

    from fitserve.layers.weight_formats import FormatPlan
    from fitserve.models.loader import linear_layouts

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = resolve_preset(preset_or_config, overrides)
    config["torch_dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    model_config = load_model_config(out_dir)
    prefixes = [part.prefix for layout in linear_layouts(model_config) if layout.module_name != "lm_head"
                for part in layout.parts]
    plan = FormatPlan(method="bitstack", num_blocks=num_blocks, ranks={prefix: rank for prefix in prefixes},
                      block_order=[prefix for _ in range(1, num_blocks) for prefix in prefixes], prequantized=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, target in expected_checkpoint_tensors(model_config, plan).items():
        if target.dtype in (torch.uint8, torch.int8):
            tensors[name] = torch.randint(0, 127, target.shape, generator=generator, dtype=target.dtype)
        else:
            values = 0.02 * torch.randn(target.shape, generator=generator)
            tensors[name] = (values + 1.0 if name.endswith("norm.weight") else values).to(target.dtype or torch.float32)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = plan.to_config()
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Write a random-weight Hugging Face checkpoint with a real model's shapes."
    )
    parser.add_argument("preset", choices=sorted(PRESETS))
    parser.add_argument("out_dir")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(_DTYPES_BY_NAME))
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers than the real model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-dir", default=None, help="copy tokenizer files from here")
    args = parser.parse_args(argv)
    overrides = {"num_hidden_layers": args.num_layers} if args.num_layers else None
    path = write_random_checkpoint(
        args.out_dir, args.preset, dtype=args.dtype, seed=args.seed,
        overrides=overrides, tokenizer_dir=args.tokenizer_dir,
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

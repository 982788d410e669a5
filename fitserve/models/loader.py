"""Build a `LlamaForCausalLM` from a Hugging Face safetensors checkpoint.

The model is first built on the meta device (no memory), then its parameters are replaced
one checkpoint tensor at a time, so peak memory is the model plus one tensor. Every tensor
name and shape is checked against config.json before any data is read, so a mismatched
checkpoint fails fast with a message that names the tensor.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from fitserve.attention import AttentionBackend, get_attention_backend
from fitserve.models import host_memory
from fitserve.models.config import ModelConfig, ModelLoadError, load_model_config
from fitserve.models.llama import LlamaForCausalLM

# Rotary frequencies some old checkpoints saved; fitserve recomputes them from config.json.
_IGNORED_TENSOR = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: a model parameter, or a row range of a fused one."""

    parameter_name: str
    row_start: int
    shape: tuple[int, ...]
    """The shape config.json implies for the checkpoint tensor."""


def expected_checkpoint_tensors(config: ModelConfig) -> dict[str, WeightTarget]:
    """Every tensor a checkpoint for `config` must hold, with its destination and shape."""
    hidden, inter, head_dim = config.hidden_size, config.intermediate_size, config.head_dim
    q_size, kv_size = config.q_size, config.kv_size
    targets: dict[str, WeightTarget] = {}

    def add(name: str, shape: tuple[int, ...], parameter: str | None = None, row_start: int = 0) -> None:
        targets[name] = WeightTarget(parameter or name, row_start, shape)

    add("model.embed_tokens.weight", (config.vocab_size, hidden))
    add("model.norm.weight", (hidden,))
    if not config.tie_word_embeddings:
        add("lm_head.weight", (config.vocab_size, hidden))

    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        add(f"{prefix}.input_layernorm.weight", (hidden,))
        add(f"{prefix}.post_attention_layernorm.weight", (hidden,))

        # q, k and v are row blocks of the fused qkv_proj, in that order.
        for name, row_start, rows in (
            ("q_proj", 0, q_size), ("k_proj", q_size, kv_size), ("v_proj", q_size + kv_size, kv_size)
        ):
            add(f"{attn}.{name}.weight", (rows, hidden), f"{attn}.qkv_proj.weight", row_start)
            if config.attention_bias:
                add(f"{attn}.{name}.bias", (rows,), f"{attn}.qkv_proj.bias", row_start)
        add(f"{attn}.o_proj.weight", (hidden, q_size))
        if config.attention_output_bias:
            add(f"{attn}.o_proj.bias", (hidden,))
        if config.qk_norm:
            add(f"{attn}.q_norm.weight", (head_dim,))
            add(f"{attn}.k_norm.weight", (head_dim,))

        # gate and up are row blocks of the fused gate_up_proj.
        for name, row_start in (("gate_proj", 0), ("up_proj", inter)):
            add(f"{mlp}.{name}.weight", (inter, hidden), f"{mlp}.gate_up_proj.weight", row_start)
            if config.mlp_bias:
                add(f"{mlp}.{name}.bias", (inter,), f"{mlp}.gate_up_proj.bias", row_start)
        add(f"{mlp}.down_proj.weight", (hidden, inter))
        if config.mlp_bias:
            add(f"{mlp}.down_proj.bias", (hidden,))
    return targets


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the index's shards, or every *.safetensors."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelLoadError(
                f"{index_path} is not a valid safetensors index (needs a 'weight_map'): {error}"
            ) from error
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        missing = [path.name for path in files if not path.is_file()]
        if missing:
            raise ModelLoadError(
                f"{index_path} lists shard files that are not in {model_dir}: {', '.join(missing)}; "
                "download the complete checkpoint"
            )
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        has_bin = any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt"))
        hint = (
            " It holds PyTorch .bin weights: convert them to safetensors first (e.g. load with "
            "transformers and call save_pretrained(..., safe_serialization=True))."
            if has_bin
            else " .bin checkpoints must be converted to safetensors first."
        )
        raise ModelLoadError(f"no weights (*.safetensors) found in {model_dir}.{hint}")
    return files


def _index_checkpoint(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """tensor name -> (file, shape), from the safetensors headers only (no data is read)."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as file:
                for name in file.keys():
                    found[name] = (path, tuple(file.get_slice(name).get_shape()))
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read weights file {path}: {error}") from error
    return found


def _check_checkpoint(
    config: ModelConfig,
    expected: dict[str, WeightTarget],
    found: dict[str, tuple[Path, tuple[int, ...]]],
    model_dir: Path,
) -> None:
    missing = [name for name in expected if name not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            f"weight {missing[0]!r}{more} is missing from the checkpoint in {model_dir}; the "
            f"checkpoint does not match its config.json ({config.architecture}, "
            f"{config.num_hidden_layers} layers)"
        )
    unexpected = [
        name
        for name in found
        if name not in expected
        and not _IGNORED_TENSOR.match(name)
        # Tied checkpoints sometimes still store the (identical) output matrix.
        and not (name == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise ModelLoadError(
            f"unexpected weight {unexpected[0]!r}{more} in {model_dir}; the checkpoint does not "
            f"match its config.json ({config.architecture})"
        )
    for name, target in expected.items():
        path, shape = found[name]
        if shape != target.shape:
            raise ModelLoadError(
                f"weight {name!r} in {path.name} has shape {list(shape)} but config.json implies "
                f"{list(target.shape)}; the checkpoint does not match its config.json"
            )


def _fill_parameters(
    model: LlamaForCausalLM,
    expected: dict[str, WeightTarget],
    found: dict[str, tuple[Path, tuple[int, ...]]],
    dtype: torch.dtype,
    device: torch.device,
    huge_pages: bool,
) -> None:
    """Replace the meta parameters with checkpoint data, one tensor in memory at a time.

    A tensor that is a whole parameter becomes that parameter directly (safetensors hands
    back an owned copy), so it is read once; only fused parameters get fresh storage that
    their parts are copied into.
    """
    parameters = dict(model.named_parameters())
    parts_per_parameter: dict[str, int] = {}
    for target in expected.values():
        parts_per_parameter[target.parameter_name] = parts_per_parameter.get(target.parameter_name, 0) + 1
    # On the CPU every parameter gets its place in one huge-page arena (host_memory), and the
    # checkpoint is copied into it; elsewhere only fused parameters need fresh storage.
    arena = None
    if device.type == "cpu" and huge_pages:
        arena = host_memory.arena_views({name: tuple(parameters[name].shape) for name in parts_per_parameter}, dtype)
    fused = {
        name: arena[name] if arena else torch.empty(parameters[name].shape, dtype=dtype, device=device)
        for name, parts in parts_per_parameter.items()
        if parts > 1
    }
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(found[name][0], []).append(name)
    with torch.no_grad():
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt", device="cpu") as file:
                for name in names:
                    target = expected[name]
                    tensor = file.get_tensor(name)
                    if target.parameter_name in fused:
                        rows = slice(target.row_start, target.row_start + target.shape[0])
                        fused[target.parameter_name][rows].copy_(tensor)
                    elif arena:
                        _set_parameter(model, target.parameter_name, arena[target.parameter_name].copy_(tensor))
                    else:
                        _set_parameter(model, target.parameter_name, tensor.to(device=device, dtype=dtype))
    for name, tensor in fused.items():
        _set_parameter(model, name, tensor)


def _set_parameter(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attribute = name.rpartition(".")
    setattr(model.get_submodule(module_name), attribute, torch.nn.Parameter(tensor, requires_grad=False))


@contextlib.contextmanager
def _skip_weight_init() -> Iterator[None]:
    """Build modules without their random initialisation: every parameter is overwritten from
    the checkpoint, and initialising meta tensors imports torch._dynamo (1.5 s of startup)."""
    saved = {cls: cls.reset_parameters for cls in (torch.nn.Linear, torch.nn.Embedding)}
    try:
        for cls in saved:
            cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
        yield
    finally:
        for cls, method in saved.items():
            cls.reset_parameters = method  # type: ignore[method-assign]


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    attention_backend: AttentionBackend | str | None = None,
    huge_pages: bool = True,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load config and weights from `model_dir`, cast to `dtype`, onto `device`, in eval mode.

    `attention_backend` is a backend object, a backend name ("auto", "torch", "triton"), or
    None for "auto". On the CPU the weights are placed in transparent huge pages where the
    kernel offers them (`host_memory`); `huge_pages=False` keeps ordinary memory.
    """
    model_dir = Path(model_dir)
    config = load_model_config(model_dir)
    expected = expected_checkpoint_tensors(config)
    found = _index_checkpoint(checkpoint_files(model_dir))
    _check_checkpoint(config, expected, found, model_dir)

    device = torch.device(device)
    if attention_backend is None or isinstance(attention_backend, str):
        attention_backend = get_attention_backend(attention_backend or "auto", device)
    with torch.device("meta"), _skip_weight_init():
        model = LlamaForCausalLM(config, attention_backend)
    model.to(dtype)  # free on meta; fixes each parameter's final dtype
    _fill_parameters(model, expected, found, dtype, device, huge_pages)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.rotary_emb.reset_inv_freq(device)
    unfilled = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if unfilled:  # a bug in expected_checkpoint_tensors, not a user error
        raise RuntimeError(f"parameters left without checkpoint data: {unfilled}")
    model.eval()
    model.requires_grad_(False)
    return model, config

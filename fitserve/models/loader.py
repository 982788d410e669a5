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
from fitserve.layers.weight_formats import DenseFormat, FormatPlan, FormatPlanError, PartShape
from fitserve.layers.weight_formats.base import WeightFormat
from fitserve.layers.weight_formats.source import TensorSource
from fitserve.models import host_memory
from fitserve.models.config import ModelConfig, ModelLoadError, load_model_config
from fitserve.layers.embedding import Int8Embedding
from fitserve.layers.linear import into_slot
from fitserve.models.llama import LlamaForCausalLM

# Rotary frequencies some old checkpoints saved; fitserve recomputes them from config.json.
_IGNORED_TENSOR = re.compile(r".*rotary_emb\.inv_freq$")


@dataclass(frozen=True)
class WeightTarget:
    """Where one checkpoint tensor goes: a model parameter, or a row range of a fused one; or,
    with `layer` set, one tensor of a part of a non-dense layer, which its weight format loads."""

    parameter_name: str
    row_start: int
    shape: tuple[int, ...]
    """The shape config.json implies for the checkpoint tensor."""
    dtype: torch.dtype | None = None
    """The stored dtype a format requires (None: any floating dtype)."""
    layer: str | None = None
    """Module name of the non-dense layer this tensor feeds (None: a parameter target)."""
    part: PartShape | None = None
    """The part of `layer` it belongs to."""


@dataclass(frozen=True)
class LinearLayout:
    """One linear layer of the model and the checkpoint matrices (parts) fused into it."""

    module_name: str
    parts: tuple[PartShape, ...]
    bias_parts: tuple[str, ...] = ()
    """Checkpoint names of the bias of each part (empty: no bias)."""


def linear_layouts(config: ModelConfig) -> list[LinearLayout]:
    """Every linear layer with its parts, in checkpoint order (q/k/v and gate/up fused)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    layouts: list[LinearLayout] = []

    def add(module: str, parts: list[tuple[str, int]], in_features: int, bias: bool) -> None:
        shapes = tuple(PartShape(prefix, rows, in_features) for prefix, rows in parts)
        layouts.append(LinearLayout(module, shapes, tuple(f"{p.prefix}.bias" for p in shapes) if bias else ()))

    for layer in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{layer}.self_attn", f"model.layers.{layer}.mlp"
        add(f"{attn}.qkv_proj", [(f"{attn}.q_proj", config.q_size), (f"{attn}.k_proj", config.kv_size),
                                 (f"{attn}.v_proj", config.kv_size)], hidden, config.attention_bias)
        add(f"{attn}.o_proj", [(f"{attn}.o_proj", hidden)], config.q_size, config.attention_output_bias)
        add(f"{mlp}.gate_up_proj", [(f"{mlp}.gate_proj", inter), (f"{mlp}.up_proj", inter)], hidden, config.mlp_bias)
        add(f"{mlp}.down_proj", [(f"{mlp}.down_proj", hidden)], inter, config.mlp_bias)
    if not config.tie_word_embeddings:
        add("lm_head", [("lm_head", config.vocab_size)], hidden, False)
    return layouts


EMBEDDING = "model.embed_tokens"


def expected_checkpoint_tensors(config: ModelConfig, plan: FormatPlan | None = None) -> dict[str, WeightTarget]:
    """Every tensor a checkpoint for `config` (quantized as `plan` says) must hold, with its
    destination, shape and, for integer formats, dtype."""
    plan = plan or FormatPlan()
    hidden, head_dim = config.hidden_size, config.head_dim
    targets: dict[str, WeightTarget] = {}

    def add(name: str, shape: tuple[int, ...], parameter: str | None = None, row_start: int = 0) -> None:
        targets[name] = WeightTarget(parameter or name, row_start, shape)

    head_format = plan.head_format()
    if config.tie_word_embeddings and not head_format.is_dense:
        # The int8 embedding shared with the w8 LM head.
        embedding = PartShape(EMBEDDING, config.vocab_size, hidden)
        specs = head_format.part_tensors(embedding) if plan.prequantized else DenseFormat().part_tensors(embedding)
        for suffix, spec in specs.items():
            targets[f"{EMBEDDING}.{suffix}"] = WeightTarget(EMBEDDING, 0, spec.shape, spec.dtype, EMBEDDING, embedding)
    else:
        add(f"{EMBEDDING}.weight", (config.vocab_size, hidden))
    add("model.norm.weight", (hidden,))

    for layout in linear_layouts(config):
        weight_format = head_format if layout.module_name == "lm_head" else plan.linear_format()
        row_start = 0
        for index, part in enumerate(layout.parts):
            if weight_format.is_dense:
                add(f"{part.prefix}.weight", (part.rows, part.in_features), f"{layout.module_name}.weight", row_start)
            else:
                specs = weight_format.part_tensors(part)  # also checks the format fits the part
                if not plan.prequantized:
                    specs = DenseFormat().part_tensors(part)
                for suffix, spec in specs.items():
                    targets[f"{part.prefix}.{suffix}"] = WeightTarget(
                        layout.module_name, row_start, spec.shape, spec.dtype, layout.module_name, part)
            if layout.bias_parts:
                add(layout.bias_parts[index], (part.rows,), f"{layout.module_name}.bias", row_start)
            row_start += part.rows

    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}"
        add(f"{prefix}.input_layernorm.weight", (hidden,))
        add(f"{prefix}.post_attention_layernorm.weight", (hidden,))
        if config.qk_norm:
            add(f"{prefix}.self_attn.q_norm.weight", (head_dim,))
            add(f"{prefix}.self_attn.k_norm.weight", (head_dim,))
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


_SAFETENSORS_DTYPE_NAMES = {torch.int8: "I8", torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32",
                            torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32"}


def _index_checkpoint(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """tensor name -> (file, shape, safetensors dtype), from the headers only (no data is read)."""
    found: dict[str, tuple[Path, tuple[int, ...], str]] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as file:
                for name in file.keys():
                    view = file.get_slice(name)
                    found[name] = (path, tuple(view.get_shape()), view.get_dtype())
        except Exception as error:  # safetensors raises its own error types for corrupt files
            raise ModelLoadError(f"cannot read weights file {path}: {error}") from error
    return found


def _check_checkpoint(
    config: ModelConfig,
    expected: dict[str, WeightTarget],
    found: dict[str, tuple[Path, tuple[int, ...], str]],
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
        path, shape, stored = found[name]
        if shape != target.shape:
            raise ModelLoadError(
                f"weight {name!r} in {path.name} has shape {list(shape)} but config.json implies "
                f"{list(target.shape)}; the checkpoint does not match its config.json"
            )
        if target.dtype is not None and stored != _SAFETENSORS_DTYPE_NAMES[target.dtype]:
            raise ModelLoadError(
                f"weight {name!r} in {path.name} is stored as {stored} but its quantization_config "
                f"implies {_SAFETENSORS_DTYPE_NAMES[target.dtype]}; the quantized checkpoint does not "
                "match its config.json (quantize the model again)"
            )


def _fill_parameters(
    model: LlamaForCausalLM,
    expected: dict[str, WeightTarget],
    found: dict[str, tuple[Path, tuple[int, ...], str]],
    dtype: torch.dtype,
    device: torch.device,
    huge_pages: bool,
) -> None:
    """Replace the meta parameters with checkpoint data, one tensor in memory at a time.

    A tensor that is a whole parameter becomes that parameter directly (safetensors hands
    back an owned copy), so it is read once; only fused parameters get fresh storage that
    their parts are copied into. Tensors of non-dense layers are gathered per layer and
    handed to the layer's weight format once all its parts are read (`_LayerFiller`).
    """
    lazy = _attach_lazy_layers(model, expected, found, device)
    expected = {name: target for name, target in expected.items() if name not in lazy}
    layer_filler = _LayerFiller(model, expected, device)
    if device.type == "cpu" and huge_pages:
        layer_filler.set_aside_huge_pages()
    parameters = dict(model.named_parameters())
    parts_per_parameter: dict[str, int] = {}
    for target in expected.values():
        if target.layer is None:
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
                    if target.layer is not None:
                        layer_filler.add(name, target, tensor)
                    elif target.parameter_name in fused:
                        rows = slice(target.row_start, target.row_start + target.shape[0])
                        fused[target.parameter_name][rows].copy_(tensor)
                    elif arena:
                        _set_parameter(model, target.parameter_name, arena[target.parameter_name].copy_(tensor))
                    else:
                        _set_parameter(model, target.parameter_name, tensor.to(device=device, dtype=dtype))
    for name, tensor in fused.items():
        _set_parameter(model, name, tensor)


def _attach_lazy_layers(model: LlamaForCausalLM, expected: dict[str, WeightTarget],
                        found: dict[str, tuple[Path, tuple[int, ...], str]], device: torch.device) -> set[str]:
    """Hand the layers whose format `reads_own_tensors` their parts and a source over the
    checkpoint files, reading nothing; returns the tensor names they took."""
    layers: dict[str, dict[PartShape, tuple[int, dict[str, str]]]] = {}
    for name, target in expected.items():
        if target.layer is None or target.layer == EMBEDDING:
            continue
        if not model.get_submodule(target.layer).weight_format.reads_own_tensors:
            continue
        assert target.part is not None
        _, names = layers.setdefault(target.layer, {}).setdefault(target.part, (target.row_start, {}))
        names[name[len(target.part.prefix) + 1:]] = name
    taken = {name for parts in layers.values() for _, names in parts.values() for name in names.values()}
    source = TensorSource({name: found[name][0] for name in taken})
    for layer, parts in layers.items():
        ordered = sorted(parts.items(), key=lambda item: item[1][0])
        module = model.get_submodule(layer)
        module.weight_format.attach_source(module, [(part, names) for part, (_, names) in ordered], source, device)
    return taken


def _fused_specs(weight_format: WeightFormat, parts: list[PartShape]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of each tensor a layer of `parts` (in row order) holds once its format
    concatenated them along rows; empty where the parts' tensors do not line up that way."""
    specs = [weight_format.part_tensors(part) for part in parts]
    fused = {}
    for suffix, first in specs[0].items():
        same = [spec.get(suffix) for spec in specs]
        if any(spec is None or spec.dtype != first.dtype or tuple(spec.shape[1:]) != tuple(first.shape[1:])
               for spec in same) or first.dtype is None:
            return {}
        fused[suffix] = ((sum(spec.shape[0] for spec in same), *first.shape[1:]), first.dtype)
    return fused


class _LayerFiller:
    """Collects the checkpoint tensors of each non-dense layer (an integer linear layer or the
    int8 embedding) and hands them to its weight format when the layer is complete. A dense
    checkpoint tensor arriving for such a layer (`--quantization`) is quantized on the spot, one
    checkpoint matrix at a time, so peak memory stays one float matrix above the model."""

    def __init__(self, model: LlamaForCausalLM, expected: dict[str, WeightTarget], device: torch.device) -> None:
        self.model = model
        self.device = device
        self.pending: dict[str, set[str]] = {}
        for name, target in expected.items():
            if target.layer is not None:
                self.pending.setdefault(target.layer, set()).add(name)
        self.parts: dict[str, dict[PartShape, dict[str, torch.Tensor]]] = {}
        self.row_starts: dict[PartShape, int] = {}
        self.layer_parts: dict[str, dict[PartShape, int]] = {}
        for target in expected.values():
            if target.layer is not None and target.part is not None:
                self.layer_parts.setdefault(target.layer, {})[target.part] = target.row_start
        self.embedding_slots: dict[str, torch.Tensor] = {}

    def set_aside_huge_pages(self) -> None:
        """Give every integer tensor these layers will hold its place in one huge-page arena
        (host_memory), as the dense parameters have theirs: a decode step streams them all from
        memory (Qwen2.5-0.5B's w4 gate_up, one row of x, 2-core Zen 4: 0.154 against 0.171 ms
        per call, median). The formats' fused tensors are copied into their places
        (`Linear.tensor_slots`); the CPU kernels repack them in place."""
        specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for layer, parts in self.layer_parts.items():
            weight_format = self._weight_format(layer)
            ordered = [part for part, _ in sorted(parts.items(), key=lambda item: item[1])]
            for suffix, shape_dtype in _fused_specs(weight_format, ordered).items():
                specs[f"{layer}.{suffix}"] = shape_dtype
        arena = host_memory.arena_tensors(specs)
        if arena is None:
            return
        for name, view in arena.items():
            layer, suffix = name.rsplit(".", 1)
            if layer == EMBEDDING:
                self.embedding_slots[suffix] = view
            else:
                self.model.get_submodule(layer).tensor_slots[suffix] = view

    def _owned(self, suffix: str, tensor: torch.Tensor) -> torch.Tensor:
        """An embedding tensor in memory of its own: its arena place, else a copy (safetensors
        hands back views of its file mapping; an owned copy lets the mapping, and every page of
        the file read so far, go when loading ends)."""
        placed = into_slot(self.embedding_slots, suffix, tensor)
        return tensor.to(self.device, copy=True) if placed is None else placed

    def _weight_format(self, layer: str) -> WeightFormat:
        return self.model.plan.head_format() if layer == EMBEDDING else self.model.get_submodule(layer).weight_format

    def add(self, name: str, target: WeightTarget, tensor: torch.Tensor) -> None:
        assert target.layer is not None and target.part is not None
        module = self.model.get_submodule(target.layer)
        suffix = name[len(target.part.prefix) + 1:]
        self.row_starts[target.part] = target.row_start
        weight_format = self._weight_format(target.layer)
        if suffix == "weight":  # a dense matrix to quantize now
            self.parts.setdefault(target.layer, {})[target.part] = weight_format.quantize_part(tensor.float(),
                                                                                                target.part)
        else:
            self.parts.setdefault(target.layer, {}).setdefault(target.part, {})[suffix] = tensor
        self.pending[target.layer].discard(name)
        if not self.pending[target.layer]:
            parts = self.parts.pop(target.layer)
            if target.layer == EMBEDDING:
                (tensors,) = parts.values()
                module.set_tensors(*(self._owned(suffix, tensors[suffix]) for suffix in ("qweight", "scales")))
            else:
                ordered = sorted(parts.items(), key=lambda item: self.row_starts[item[0]])
                weight_format.load_parts(module, ordered, self.device)


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


def format_plan(config: ModelConfig, model_dir: Path, quantization: str | None = None,
                group_size: int | None = None) -> FormatPlan:
    """The weight formats of the model: its checkpoint's quantization_config, or `quantization`
    applied at load to a dense checkpoint (round to nearest), or dense."""
    raw = config.extra.get("quantization_config")
    try:
        if raw is not None:
            plan = FormatPlan.from_config(raw)
            if quantization not in (None, plan.method):
                raise ModelLoadError(f"{model_dir} is already quantized ({plan.method}); drop --quantization "
                                     f"{quantization} or load the dense original")
            return plan
        if quantization is None:
            return FormatPlan()
        return FormatPlan(method=quantization, group_size=group_size or FormatPlan.group_size)
    except FormatPlanError as error:
        raise ModelLoadError(f"{model_dir / 'config.json'}: {error}") from error


def load_model(
    model_dir: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    attention_backend: AttentionBackend | str | None = None,
    huge_pages: bool = True,
    quantization: str | None = None,
    group_size: int | None = None,
    weight_memory: int | None = None,
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Load config and weights from `model_dir`, cast to `dtype`, onto `device`, in eval mode.

    `attention_backend` is a backend object, a backend name ("auto", "torch", "triton"), or
    None for "auto". On the CPU the weights are placed in transparent huge pages where the
    kernel offers them (`host_memory`); `huge_pages=False` keeps ordinary memory. A checkpoint
    made by `fitserve quantize` loads in its formats; `quantization` ("w8", "w4") quantizes a
    dense one while loading (groups of `group_size` columns for w4). `dtype` is then the dtype
    of activations, norms and biases.

    A BitStack checkpoint loads the blocks that fit `weight_memory` bytes (None: all of them),
    reading only those; `model.elastic_weights` then moves it to other budgets.
    """
    model_dir = Path(model_dir)
    config = load_model_config(model_dir)
    plan = format_plan(config, model_dir, quantization, group_size)
    if weight_memory is not None and plan.method != "bitstack":
        raise ModelLoadError(f"--weight-memory needs a BitStack model (made with `fitserve quantize MODEL "
                             f"--method bitstack --out DIR`); {model_dir} holds {plan.method} weights")
    try:
        expected = expected_checkpoint_tensors(config, plan)
    except ValueError as error:  # a group size that does not divide a layer's width
        raise ModelLoadError(f"cannot quantize {model_dir} as {plan.method}: {error}; choose a group size "
                             "that divides every layer's input width (e.g. 32, 64 or 128)") from error
    found = _index_checkpoint(checkpoint_files(model_dir))
    _check_checkpoint(config, expected, found, model_dir)

    device = torch.device(device)
    if attention_backend is None or isinstance(attention_backend, str):
        attention_backend = get_attention_backend(attention_backend or "auto", device)
    with torch.device("meta"), _skip_weight_init():
        model = LlamaForCausalLM(config, attention_backend, plan)
    model.to(dtype)  # free on meta; fixes each parameter's final dtype
    if isinstance(model.model.embed_tokens, Int8Embedding):
        model.model.embed_tokens.dtype = dtype
    _fill_parameters(model, expected, found, dtype, device, huge_pages)
    if config.tie_word_embeddings:
        model.tie_weights()
    model.rotary_emb.reset_inv_freq(device)
    unfilled = [name for name, parameter in model.named_parameters() if parameter.is_meta]
    if unfilled:  # a bug in expected_checkpoint_tensors, not a user error
        raise RuntimeError(f"parameters left without checkpoint data: {unfilled}")
    model.eval()
    model.requires_grad_(False)
    if plan.method == "bitstack":
        _load_budget(model, plan, model_dir, weight_memory)
    return model, config


def _load_budget(model: LlamaForCausalLM, plan: FormatPlan, model_dir: Path, weight_memory: int | None) -> None:
    """Attach the model's `ElasticWeights` and load the blocks `weight_memory` allows."""
    from fitserve.models.cpu_decode import decline
    from fitserve.models.elastic_weights import ElasticWeights

    try:
        elastic = ElasticWeights(model, plan.block_order)
    except ValueError as error:
        raise ModelLoadError(f"{model_dir / 'config.json'}: {error}") from error
    elastic.set_budget(elastic.max_bytes if weight_memory is None else weight_memory)
    model.elastic_weights = elastic
    # The fused decode stack holds the projections' kernel objects; BitStack layers have none
    # yet (their compiled kernel is to come), so decode steps run layer by layer.
    model.fused_cpu_decode.enabled = False
    decline("the fused CPU decode stack does not run bitstack weights yet; decode steps run layer by layer "
            "in Python")

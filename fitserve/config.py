"""Engine settings: `EngineArgs` is what users set; it is validated here, at the edge."""

from __future__ import annotations

import re
import typing
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:  # torch is imported where a dtype or device is resolved, so that
    import torch   # `fitserve --help` and `--version` answer without loading it



class ConfigError(ValueError):
    """A setting is invalid; the message says which one and what to use instead."""


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_size(text: str | int | float) -> int:
    """Bytes from "2GiB", "512MiB", "1.5GB" or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ConfigError(
            f"cannot read memory size {text!r}: use a number with an optional unit, "
            "e.g. 2GiB, 512MiB, 1.5GB or 1000000"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def default_model_dir() -> Path:
    """The small trained model that ships inside the package."""
    return Path(__file__).resolve().parent / "assets" / "fitserve-tiny"


_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}
"""Accepted dtype names and aliases -> the name of the torch dtype."""


def resolve_dtype(name: str | torch.dtype, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` follows the checkpoint, with two exceptions: float16 on CPU (slow there) becomes
    bfloat16, and a float32 checkpoint on a GPU runs in bfloat16 (half the bytes per decode
    step, tensor cores; what vLLM does too). An explicit dtype is always honoured."""
    import torch

    if isinstance(name, torch.dtype):
        return name
    if name == "auto":
        if device.type == "cpu" and checkpoint_dtype == torch.float16:
            return torch.bfloat16
        if device.type == "cuda" and checkpoint_dtype == torch.float32:
            return torch.bfloat16
        return checkpoint_dtype
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {name!r}: use auto, float32, bfloat16 or float16")
    return getattr(torch, _DTYPES[name])


def resolve_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu or cuda[:N]") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device cuda was asked for but this torch build sees no CUDA GPU; "
            "use --device cpu, or install a CUDA build of torch"
        )
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not supported: use cpu or cuda")
    return device


KV_CACHE_DTYPES = ("auto", "int8")
"""Values of `--kv-cache-dtype`: auto (the model's dtype) or int8 (per-token scales)."""


@dataclass
class EngineArgs:
    """Everything that configures an engine.

    This class is the one source of the engine's command-line flags (`fitserve/cli_args.py`
    derives them, as vLLM's `EngineArgs.add_cli_args` does): each field becomes
    `--field-name` with the field's default, its docstring as the help text, the choices of a
    `Literal` annotation, and `--no-field-name` for booleans. A new field needs a docstring
    (tests/test_cli_args.py checks) and nothing else to appear on every command.
    """

    model: str | None = None
    """Hugging Face model directory (config.json, safetensors, tokenizer); unset: the bundled model."""
    tokenizer: str | None = None
    """Tokenizer directory, if it is not the model's."""
    dtype: str = "auto"
    """auto (follow the checkpoint), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, or cuda[:N]."""
    kv_cache_memory: str | int | None = None
    """Bytes for the KV cache, e.g. 2GiB or 512MiB; unset: 1 GiB on CPU, on GPU what
    gpu_memory_utilization leaves free."""
    gpu_memory_utilization: float = 0.9
    """On GPU without kv_cache_memory: the share of total GPU memory fitserve may use."""
    block_size: int = 16
    """Tokens per KV-cache block (a power of two)."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill chunks + decodes)."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt + output; unset: the model's max_position_embeddings (or what the KV cache holds)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    enable_chunked_prefill: bool = True
    """Split long prompts over steps so running decodes are never stalled."""
    seed: int = 0
    """Seed of the engine's random generator for requests without a seed."""
    num_threads: int | None = None
    """CPU threads for torch; unset: torch's default."""
    attention_backend: Literal["auto", "torch", "triton"] = "auto"
    """auto (Triton on CUDA, torch elsewhere), torch or triton."""
    kv_cache_dtype: Literal["auto", "int8"] = "auto"
    """auto (the model's dtype) or int8: K and V stored as int8 with one float32 scale per token
    per KV head (fitserve.attention.cache_layout says why), ~1.9x the tokens in the same
    kv_cache_memory; every attention path reads the int8 values directly."""
    enforce_eager: bool = False
    """On CUDA, run decode steps eagerly instead of replaying CUDA graphs."""
    max_seq_len_to_capture: int = 8192
    """Longest context a CUDA-graph decode step serves; a step with a longer one runs eagerly.
    The graphs' attention grid is sized for this length, and programs past a sequence's real
    length still launch, so a bound far above the contexts in use costs time every step."""
    quantization: Literal["w8", "w4"] | None = None
    """w8 or w4: quantize a dense checkpoint's projections while loading (round to nearest;
    the LM head / tied embedding in w8), as vLLM's dynamic quantization does. Checkpoints made
    by `fitserve quantize` load in their own format without it."""
    quantization_group_size: int = 128
    """Input columns per scale and zero for --quantization w4."""
    weight_memory: str | int | None = None
    """BitStack models (`fitserve quantize --method bitstack`): bytes for all weights, e.g.
    300MiB or 1.5GB; the most valuable blocks that fit are loaded (within one block of it).
    Unset: the whole stack. A running server can change it (POST /v1/admin/weight-memory)."""

    scheduling_policy: Literal["fcfs", "priority", "vtc"] = "fcfs"
    """Order of the waiting queue and choice of preemption victims: fcfs (arrival order),
    priority (each request's `priority`, lower first, ties by arrival; vLLM's convention) or
    vtc (fair share of tokens between clients, the Virtual Token Counter: a client is the
    API key's tenant or the OpenAI `user` field)."""
    vtc_prompt_token_weight: float = 1.0
    """vtc: service charged per prompt token (the VTC paper's w_in)."""
    vtc_output_token_weight: float = 2.0
    """vtc: service charged per generated token (w_out; a decode token costs more time per
    token than a prefill token, so the paper weighs it 2)."""
    client_weights: dict[str, float] | None = dataclasses.field(default=None, metadata={"cli": False})
    """vtc: client -> share weight (2 gets twice the service of 1; absent clients weigh 1).
    `serve` fills it from the weights in --api-keys-file; not a command-line flag."""

    preemption_mode: Literal["recompute", "swap"] = "recompute"
    """What happens to a running request's KV when blocks run out: recompute (drop it, compute
    the prompt and output again later) or swap (copy it to host memory, `swap_space`, and back
    when the request resumes; on a CPU this saves repeating a whole prefill)."""
    swap_space: str | int = "4GiB"
    """Host memory for swapped-out KV with preemption_mode swap ("4GiB", vLLM's default); a
    request that does not fit falls back to recompute."""
    host_prefix_cache: bool = True
    """With preemption_mode swap and prefix caching: swap_space is also a second tier of the
    prefix cache. Cached blocks the device overwrites are copied there first (one extra copy
    per evicted block, only under memory pressure), and a new request whose prefix is held
    there (a conversation's next turn) copies it back instead of recomputing it. Off: host
    memory holds swapped-out requests only."""

    slo: str | None = None
    """Latency targets the engine follows, e.g. "ttft=500ms,tpot=50ms,p=90". A cap on the
    requests running at once (from max_num_seqs, down to 1, never preempting) follows the
    mean step time, the TPOT every running request is getting: one below the running
    requests while steps, and the running requests' percentile TPOT so far, are over 0.9 of
    the TPOT target; one more, at most every 8 steps, while steps have room for it and a
    request that can still meet its TTFT waits. Requests past their TTFT target wait behind
    those that can still meet it (they still run). Every 2 s window the step token budget
    (from max_num_batched_tokens, between 64 tokens and 4x the start) grows when the
    finished requests' percentile TTFT misses or late requests wait, and shrinks when TPOT
    misses without TTFT slack; a budget move after which fewer requests meet the targets is
    taken back. Needs chunked prefill."""

    def __post_init__(self) -> None:
        if parse_size(self.swap_space) <= 0:
            raise ConfigError("swap_space must be positive")
        if self.slo is not None:
            from fitserve.bench.slo import parse_slo

            try:
                parse_slo(self.slo)
            except ValueError as error:
                raise ConfigError(f"slo: {error}") from error
            if not self.enable_chunked_prefill:
                raise ConfigError("slo needs chunked prefill: the budget it moves may fall below a prompt's length")
        for name in ("vtc_prompt_token_weight", "vtc_output_token_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value >= 0 and value < float("inf")):
                raise ConfigError(f"{name} must be a finite number >= 0 (got {value!r})")
        for client, weight in (self.client_weights or {}).items():
            if not (isinstance(weight, (int, float)) and 0 < weight < float("inf")):
                raise ConfigError(f"the weight of client {client!r} must be a positive number (got {weight!r})")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a power of two >= 1 (got {self.block_size})")
        if self.max_num_batched_tokens < 1:
            raise ConfigError(f"max_num_batched_tokens must be >= 1 (got {self.max_num_batched_tokens})")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1 (got {self.max_num_seqs})")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"gpu_memory_utilization must be in (0, 1] (got {self.gpu_memory_utilization})"
            )
        if self.quantization is not None and self.quantization not in ("w8", "w4"):
            raise ConfigError(
                f"quantization must be w8 or w4 (got {self.quantization!r}); mixllm needs calibration: "
                "run `fitserve quantize MODEL --method mixllm --out DIR` and load DIR"
            )
        if self.quantization_group_size < 2 or self.quantization_group_size % 2:
            raise ConfigError(f"quantization_group_size must be an even number >= 2 "
                              f"(got {self.quantization_group_size})")
        if self.max_seq_len_to_capture < 1:
            raise ConfigError(f"max_seq_len_to_capture must be >= 1 (got {self.max_seq_len_to_capture})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1 (got {self.max_model_len})")
        if self.weight_memory is not None and parse_size(self.weight_memory) <= 0:
            raise ConfigError("weight_memory must be positive")
        if self.kv_cache_memory is not None:
            size = parse_size(self.kv_cache_memory)
            if size <= 0:
                raise ConfigError("kv_cache_memory must be positive")
        for name, choices in literal_choices(type(self)).items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be {_one_of(choices)} (got {getattr(self, name)!r})")

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else default_model_dir()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def field_types(cls: type) -> dict[str, Any]:
    """Each dataclass field's annotation as a type. Resolved field by field: a name that only
    exists for type checkers (`torch.dtype` here, where torch is not imported) gives None for
    that field instead of failing for all of them."""
    import sys

    resolved: dict[str, Any] = {}
    for field in fields(cls):
        annotation = field.type
        if isinstance(annotation, str):
            owner = next((klass for klass in cls.__mro__ if field.name in klass.__dict__.get("__annotations__", {})), cls)
            namespace = {**vars(typing), **vars(sys.modules[owner.__module__])}
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 - the class's own annotations
            except (NameError, AttributeError, TypeError):
                annotation = None
        resolved[field.name] = annotation
    return resolved


def literal_choices(cls: type) -> dict[str, tuple]:
    """The fields of a dataclass annotated `Literal[...]`, with their allowed values."""
    return {name: typing.get_args(annotation) for name, annotation in field_types(cls).items()
            if typing.get_origin(annotation) is Literal}


def _one_of(choices: tuple) -> str:
    words = [str(choice) for choice in choices]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"

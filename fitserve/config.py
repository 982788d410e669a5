"""Engine settings: `EngineArgs` is what users set; it is validated here, at the edge."""

from __future__ import annotations

import re
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from fitserve.engine.policy import POLICY_NAMES


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
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def resolve_dtype(name: str | torch.dtype, checkpoint_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """`auto` follows the checkpoint, with two exceptions: float16 on CPU (slow there) becomes
    bfloat16, and a float32 checkpoint on a GPU runs in bfloat16 (half the bytes per decode
    step, tensor cores; what vLLM does too). An explicit dtype is always honoured."""
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
    return _DTYPES[name]


def resolve_device(name: str) -> torch.device:
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


@dataclass
class EngineArgs:
    """Everything that configures an engine. CLI flags map one-to-one onto these fields."""

    model: str | None = None
    """Hugging Face model directory; None means the bundled model."""
    tokenizer: str | None = None
    """Tokenizer directory if it differs from the model's."""
    dtype: str = "auto"
    """auto (follow the checkpoint), float32, bfloat16 or float16."""
    device: str = "auto"
    """auto (CUDA if available, else CPU), cpu, or cuda[:N]."""
    kv_cache_memory: str | int | None = None
    """Bytes for the KV cache ("2GiB"); None: a default (1 GiB on CPU, free memory on GPU)."""
    gpu_memory_utilization: float = 0.9
    """On GPU without kv_cache_memory: the share of total GPU memory fitserve may use."""
    block_size: int = 16
    """Tokens per KV-cache block."""
    max_num_batched_tokens: int = 2048
    """Token budget of one engine step (prefill chunks + decodes)."""
    max_num_seqs: int = 128
    """Most requests running at once."""
    max_model_len: int | None = None
    """Longest prompt + output; None: the model's max_position_embeddings."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""
    enable_chunked_prefill: bool = True
    """Split long prompts over steps so running decodes are never stalled."""
    seed: int = 0
    """Seed of the engine's random generator for requests without a seed."""
    num_threads: int | None = None
    """CPU threads for torch; None keeps torch's default."""
    attention_backend: str = "auto"
    """auto (Triton on CUDA, torch elsewhere), torch or triton."""
    enforce_eager: bool = False
    """Disable CUDA graphs."""
    max_seq_len_to_capture: int = 8192
    """Longest context a CUDA-graph decode step serves; a step with a longer one runs eagerly.
    The graphs' attention grid is sized for this length, and programs past a sequence's real
    length still launch, so a bound far above the contexts in use costs time every step."""

    scheduling_policy: str = "fcfs"
    """Order of the waiting queue and choice of preemption victims: fcfs (arrival order),
    priority (each request's `priority`, lower first, ties by arrival; vLLM's convention) or
    vtc (fair share of tokens between clients, the Virtual Token Counter: a client is the
    API key's tenant or the OpenAI `user` field)."""
    vtc_prompt_token_weight: float = 1.0
    """vtc: service charged per prompt token (the VTC paper's w_in)."""
    vtc_output_token_weight: float = 2.0
    """vtc: service charged per generated token (w_out; a decode token costs more time per
    token than a prefill token, so the paper weighs it 2)."""
    client_weights: dict[str, float] | None = None
    """vtc: client -> share weight (2 gets twice the service of 1; absent clients weigh 1).
    `serve` fills it from the weights in --api-keys-file; not a command-line flag."""

    preemption_mode: str = "recompute"
    """What happens to a running request's KV when blocks run out: recompute (drop it, compute
    the prompt and output again later) or swap (copy it to host memory, `swap_space`, and back
    when the request resumes; on a CPU this saves repeating a whole prefill)."""
    swap_space: str | int = "4GiB"
    """Host memory for swapped-out KV with preemption_mode swap ("4GiB", vLLM's default); a
    request that does not fit falls back to recompute."""

    slo: str | None = None
    """Latency targets the step token budget follows, e.g. "ttft=500ms,tpot=50ms,p=90": every
    window the engine compares its own percentile TTFT and TPOT with them and shrinks the
    budget when TPOT misses, grows it when TTFT misses (from max_num_batched_tokens, between
    a floor of 64 tokens and 4x the start). Needs chunked prefill."""

    def __post_init__(self) -> None:
        if self.preemption_mode not in ("recompute", "swap"):
            raise ConfigError(f"preemption_mode must be recompute or swap (got {self.preemption_mode!r})")
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
        if self.scheduling_policy not in POLICY_NAMES:
            raise ConfigError(
                f"scheduling_policy must be one of {', '.join(POLICY_NAMES)} (got {self.scheduling_policy!r})"
            )
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
        if self.max_seq_len_to_capture < 1:
            raise ConfigError(f"max_seq_len_to_capture must be >= 1 (got {self.max_seq_len_to_capture})")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len must be >= 1 (got {self.max_model_len})")
        if self.kv_cache_memory is not None:
            size = parse_size(self.kv_cache_memory)
            if size <= 0:
                raise ConfigError("kv_cache_memory must be positive")
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise ConfigError(
                f"attention_backend must be auto, torch or triton (got {self.attention_backend!r})"
            )

    @property
    def model_dir(self) -> Path:
        return Path(self.model) if self.model else default_model_dir()

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

"""The hardware limit: what the machine can do (measured) and what the model needs (counted).

Decode reads every weight once per step plus the KV cache of every running request, so its
best step time is bytes / memory bandwidth; prefill does about 2 · parameters FLOPs per token
(plus attention) and is bound by matmul FLOP/s for long prompts. A step can go no faster than
max(bytes / bandwidth, FLOPs / peak) (the roofline). The machine's own bandwidth and FLOP/s
are measured here, in the same run, rather than taken from a spec sheet.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from fitserve.config import resolve_dtype


@dataclass(frozen=True)
class ModelShape:
    """The sizes that decide bytes and FLOPs, read from a Hugging Face config.json."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    dtype_name: str
    dtype_bytes: int
    projection_bits: float = 0.0
    """Stored bits per weight of the layers' projections in a quantized model (scales and
    zeros counted); 0 for dense weights in `dtype_bytes`."""
    lm_head_bits: float = 0.0
    """The same for the LM head (the tied embedding)."""
    quantization: str = "dense"
    kv_cache_dtype: str = "auto"
    """`--kv-cache-dtype` of the server: "auto" stores K/V in the model dtype, "int8" one byte
    per element plus a float32 scale per token and head."""

    @classmethod
    def from_config(cls, config: dict, dtype: torch.dtype | None = None,
                    weight_memory: int | None = None) -> "ModelShape":
        """`weight_memory`: the budget an elastic (BitStack) model is loaded under, if any."""
        num_heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        checkpoint_dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"))
        dtype = dtype or checkpoint_dtype
        return cls(
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=int(config.get("head_dim") or hidden // num_heads),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=bool(config.get("attention_bias", config.get("model_type") == "qwen2")),
            dtype_name=str(dtype).removeprefix("torch."),
            dtype_bytes=torch.empty((), dtype=dtype).element_size(),
            **quantized_bits(config, weight_memory),
        )

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, dtype: str = "auto",
                       device: torch.device | None = None, kv_cache_dtype: str = "auto",
                       weight_memory: int | None = None) -> "ModelShape":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        checkpoint_dtype = getattr(torch, str(config.get("torch_dtype") or config.get("dtype") or "float32"))
        resolved = resolve_dtype(dtype, checkpoint_dtype, device or torch.device("cpu"))
        return replace(cls.from_config(config, resolved, weight_memory), kv_cache_dtype=kv_cache_dtype)

    # -- parameter counts ------------------------------------------------------------------
    @property
    def layer_matmul_params(self) -> int:
        """Weights of one layer's linear projections (attention q, k, v, o and the gated MLP)."""
        q_and_o = 2 * self.hidden_size * self.num_heads * self.head_dim
        k_and_v = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        mlp = 3 * self.hidden_size * self.intermediate_size
        return q_and_o + k_and_v + mlp

    @property
    def layer_other_params(self) -> int:
        """Norm weights and attention biases: few, but read every step like the rest."""
        biases = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.attention_bias else 0
        return 2 * self.hidden_size + biases

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def total_params(self) -> int:
        lm_head = 0 if self.tie_word_embeddings else self.embedding_params
        return (self.embedding_params + lm_head + self.hidden_size
                + self.num_layers * (self.layer_matmul_params + self.layer_other_params))

    @property
    def matmul_params_per_token(self) -> int:
        """Weights each token is multiplied by: every layer's projections and the LM head."""
        return self.num_layers * self.layer_matmul_params + self.embedding_params

    @property
    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one forward pass reads: all of them, as stored (quantized
        projections and LM head at their bits per weight), except that an untied input
        embedding table is only indexed (a few rows), not read whole."""
        read_params = self.total_params - (0 if self.tie_word_embeddings else self.embedding_params)
        if not self.projection_bits:
            return read_params * self.dtype_bytes
        projections = self.num_layers * self.layer_matmul_params
        other = read_params - projections - self.embedding_params
        head_bits = self.lm_head_bits or 8 * self.dtype_bytes
        return round(projections * self.projection_bits / 8 + self.embedding_params * head_bits / 8
                     + other * self.dtype_bytes)

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (GQA: only the KV heads are stored), as the
        cache stores them (int8 values and their scales for an int8 cache)."""
        from fitserve.attention.cache_layout import bytes_per_token_per_head

        per_head = bytes_per_token_per_head(self.head_dim, self.kv_cache_dtype, getattr(torch, self.dtype_name))
        return 2 * self.num_layers * self.num_kv_heads * per_head

    # -- per-step costs ---------------------------------------------------------------------
    def attention_flops(self, query_tokens: int, context_tokens: float) -> float:
        """QKᵀ and attention·V: 2 matmuls of 2·head_dim FLOPs per query-key pair and head."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * query_tokens * context_tokens

    def decode_step_bytes(self, batch_size: float, context_tokens: float) -> float:
        """Weights once, plus each request's KV read over its context and written for one token."""
        return self.weight_bytes_per_step + batch_size * (context_tokens + 1) * self.kv_bytes_per_token

    def decode_step_flops(self, batch_size: float, context_tokens: float) -> float:
        return batch_size * (2.0 * self.matmul_params_per_token + self.attention_flops(1, context_tokens))

    def prefill_bytes(self, prompt_tokens: float) -> float:
        return self.weight_bytes_per_step + prompt_tokens * self.kv_bytes_per_token

    def prefill_flops(self, prompt_tokens: float) -> float:
        """The work a prompt needs: every layer for every token, causal attention (token i
        attends to i + 1 keys, on average (n + 1) / 2), and logits for the last token only,
        since only that one is sampled (as in fitserve, vLLM and transformers' generate)."""
        layers = 2.0 * self.num_layers * self.layer_matmul_params * prompt_tokens
        return layers + self.attention_flops(prompt_tokens, (prompt_tokens + 1) / 2) + 2.0 * self.embedding_params

    def to_dict(self) -> dict:
        described = asdict(self)
        described.update(total_params=self.total_params, weight_bytes_per_step=self.weight_bytes_per_step,
                         kv_bytes_per_token=self.kv_bytes_per_token)
        return described


def bitstack_projection_bits(config: dict, quantization: dict, head_bits: float,
                             weight_memory: int | None) -> float:
    """Bits per projection weight of a BitStack model: the whole stack of every matrix, or, when
    the server loads it under `--weight-memory`, what the budget leaves for the projections
    once the embedding / LM head (at `head_bits`, or the checkpoint dtype when dense) and the
    norms are held (within one block of what the engine loads)."""
    from fitserve.quant.bitstack_packing import block_bytes

    shape = ModelShape.from_config({key: value for key, value in config.items() if key != "quantization_config"})
    widths = {"q_proj": (shape.num_heads * shape.head_dim, shape.hidden_size),
              "k_proj": (shape.num_kv_heads * shape.head_dim, shape.hidden_size),
              "v_proj": (shape.num_kv_heads * shape.head_dim, shape.hidden_size),
              "o_proj": (shape.hidden_size, shape.num_heads * shape.head_dim),
              "gate_proj": (shape.intermediate_size, shape.hidden_size),
              "up_proj": (shape.intermediate_size, shape.hidden_size),
              "down_proj": (shape.hidden_size, shape.intermediate_size)}
    num_blocks = int(quantization.get("num_blocks", 1))
    ranks = quantization.get("ranks") or {}
    full = sum(num_blocks * block_bytes(*widths[prefix.rsplit(".", 1)[-1]], int(rank))
               for prefix, rank in ranks.items() if prefix.rsplit(".", 1)[-1] in widths)
    projections = shape.num_layers * shape.layer_matmul_params
    if weight_memory is not None:
        # The LM head at head_bits; an untied input embedding stays dense.
        head_bytes = (head_bits / 8 if head_bits else shape.dtype_bytes) * shape.embedding_params
        other = shape.total_params - projections - shape.embedding_params
        full = min(full, max(0.0, weight_memory - head_bytes - other * shape.dtype_bytes))
    return 8 * full / projections


def quantized_bits(config: dict, weight_memory: int | None = None) -> dict:
    """projection_bits / lm_head_bits / quantization of a `fitserve quantize` config.json
    (empty for dense checkpoints): w8 stores a float32 scale per row, w4 a float16 scale and a
    uint8 zero per group, mixllm a share of rows in w8 and the rest in w4."""
    quantization = config.get("quantization_config")
    if not isinstance(quantization, dict) or quantization.get("quant_method") != "fitserve":
        return {}
    from fitserve.quant.packing import w4_bits_per_weight, w8_bits_per_weight

    w8_bits = w8_bits_per_weight(int(config["hidden_size"]))
    w4_bits = w4_bits_per_weight(int(quantization.get("group_size", 128)))
    method = quantization.get("method")
    head_bits = w8_bits if quantization.get("lm_head", "w8") == "w8" else 0.0
    if method == "bitstack":
        bits = bitstack_projection_bits(config, quantization, head_bits, weight_memory)
        return {"projection_bits": bits, "lm_head_bits": head_bits, "quantization": "bitstack"}
    if method == "w8":
        bits = w8_bits
    elif method == "w4":
        bits = w4_bits
    else:
        fraction = float(quantization.get("high_precision_fraction", 0.1))
        bits = fraction * w8_bits + (1 - fraction) * w4_bits
    return {"projection_bits": bits, "lm_head_bits": head_bits, "quantization": str(method)}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def last_level_cache_bytes() -> int | None:
    """Size of the CPU's largest cache (Linux sysfs), or None where it cannot be read."""
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = path.read_text().strip().upper()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=None)


def memory_test_bytes(device: torch.device, minimum: int = 256 * 2**20) -> int:
    """How large a buffer a bandwidth test needs so that it measures memory, not cache.

    Server CPUs can have last-level caches of hundreds of MiB (480 MiB on a Xeon seen here): a
    256 MiB buffer then stays cached between repeats and the "bandwidth" is the cache's, about
    twice the memory's, while a model's weights (larger than the cache) stream from memory.
    On CPUs the buffer is therefore at least twice the largest cache.
    """
    if device.type != "cpu":
        return minimum
    cache = last_level_cache_bytes() or 0
    return max(minimum, 2 * cache)


def measure_memory_bandwidth(device: torch.device, size_bytes: int | None = None,
                             min_time_s: float = 0.3) -> float:
    """Bytes/s of a large tensor copy (each copy reads and writes size_bytes); best of several
    repeats, since on a shared machine the fastest repeat is the one least disturbed.
    size_bytes defaults to `memory_test_bytes`, large enough that caches do not serve it."""
    size_bytes = size_bytes or memory_test_bytes(device)
    source = torch.ones(size_bytes // 4, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    target.copy_(source)  # first touch: page faults are not bandwidth
    best, spent = 0.0, 0.0
    while spent < min_time_s or best == 0.0:
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        best = max(best, 2 * source.numel() * 4 / elapsed)
    return best


def measure_matmul_flops(device: torch.device, dtype: torch.dtype, min_time_s: float = 0.3,
                         max_size: int | None = None) -> tuple[float, int]:
    """(FLOP/s, matrix size) of the fastest square matmul in the model's dtype.

    Sizes double from 256 up to max_size (or until one matmul takes a quarter second), each
    timed for a share of min_time_s, and the best rate over all sizes is the peak: which size
    is fastest depends on caches and on how many threads a shared machine lets run.
    """
    max_size = max_size or (8192 if device.type == "cuda" else 2048)
    sizes = []
    size = 256
    while size <= max_size:
        sizes.append(size)
        size *= 2
    best_rate, best_size = 0.0, sizes[0]
    for size in sizes:
        left = torch.randn(size, size, device=device).to(dtype)
        right = torch.randn(size, size, device=device).to(dtype)
        torch.matmul(left, right)  # first call: allocation and kernel selection
        fastest, spent, repeats = math.inf, 0.0, 0
        while spent < min_time_s / len(sizes) or repeats < 2:
            synchronize(device)
            start = time.perf_counter()
            torch.matmul(left, right)
            synchronize(device)
            elapsed = time.perf_counter() - start
            fastest, spent, repeats = min(fastest, elapsed), spent + elapsed, repeats + 1
        if 2.0 * size**3 / fastest > best_rate:
            best_rate, best_size = 2.0 * size**3 / fastest, size
        if fastest > 0.25:
            break
    return best_rate, best_size


def measure_dtype_matmul_flops(device: torch.device, dtype: torch.dtype, min_time_s: float = 0.3,
                               float32_measured: tuple[float, int] | None = None) -> tuple[float, int, str]:
    """(FLOP/s, matrix size, arithmetic dtype) of the fastest way this machine multiplies
    matrices of `dtype`.

    A CPU without bf16/fp16 arithmetic (no AVX512-BF16, AMX or AVX512-FP16: most AVX2 and
    many AVX-512 parts) runs torch's half-precision matmul through a slow reference path,
    1-2 GFLOP/s on a 2-core Zen 3 next to ~170 in float32. Widened to float32 the same
    product runs at the float32 rate (fitserve computes large half-precision matmuls that
    way there), so on the CPU the limit for a half-precision dtype is the better of the two;
    the third element says which arithmetic set it. `float32_measured` reuses a float32
    measurement just taken, so that both dtypes' limits come from the same one.
    """
    flops, size = measure_matmul_flops(device, dtype, min_time_s=min_time_s)
    arithmetic = str(dtype).removeprefix("torch.")
    if device.type == "cpu" and dtype in (torch.bfloat16, torch.float16):
        wide_flops, wide_size = float32_measured or measure_matmul_flops(device, torch.float32, min_time_s=min_time_s)
        if wide_flops > flops:
            return wide_flops, wide_size, "float32"
    return flops, size, arithmetic


def measure_hardware_limit(device: torch.device, dtype: torch.dtype, min_time_s: float = 0.3) -> dict:
    """The machine's own bandwidth and matmul FLOP/s, measured now."""
    bandwidth = measure_memory_bandwidth(device, min_time_s=min_time_s)
    flops, size, arithmetic = measure_dtype_matmul_flops(device, dtype, min_time_s=min_time_s)
    return {"device": str(device), "dtype": str(dtype).removeprefix("torch."),
            "memory_bandwidth_bytes_per_s": bandwidth, "matmul_flops_per_s": flops,
            "matmul_size": size, "matmul_arithmetic": arithmetic,
            "method": "best of repeated 256 MiB tensor copies (read + write); "
            f"fastest square matmul over sizes 256..., best at {size}x{size} in {arithmetic}",
            "threads": torch.get_num_threads() if device.type == "cpu" else None}


def combine_limits(before: dict | None, after: dict | None) -> dict | None:
    """The machine's limit from measurements before and after the runs: the higher of each.

    A peak can only be underestimated by a disturbed measurement, so on a shared machine the
    best of two observations is the better estimate; both stay in the report.
    """
    measured = [limit for limit in (before, after) if limit]
    if not measured:
        return None
    combined = dict(max(measured, key=lambda limit: limit["matmul_flops_per_s"]))
    combined["memory_bandwidth_bytes_per_s"] = max(m["memory_bandwidth_bytes_per_s"] for m in measured)
    combined["measurements"] = [{key: limit[key] for key in ("memory_bandwidth_bytes_per_s", "matmul_flops_per_s")}
                                for limit in measured]
    return combined


def achieved_fractions(shape: ModelShape, limit: dict, summary: dict) -> dict:
    """How close the run came to the roofline, for decode and for prefill.

    Decode: one step serves the time-averaged number of requests that were decoding at once
    (B, from the client's timestamps) at their mean context; its bound is
    max(bytes / bandwidth, FLOPs / peak), its achieved time the median TPOT.
    Prefill: the bound for the mean prompt against the fastest TTFT seen (TTFT also holds
    queueing, HTTP and the first decode step, so this fraction is a lower bound).
    """
    bandwidth = limit["memory_bandwidth_bytes_per_s"]
    peak = limit["matmul_flops_per_s"]
    result: dict = {"decode": None, "prefill": None}
    mean_input = summary.get("mean_input_tokens")
    mean_output = summary.get("mean_output_tokens")
    tpot_ms = summary["tpot_ms"]["median"]
    if tpot_ms and mean_input is not None and mean_output is not None:
        batch = summary.get("mean_concurrent_decodes") or 1.0
        context = mean_input + mean_output / 2
        step_bytes = shape.decode_step_bytes(batch, context)
        step_flops = shape.decode_step_flops(batch, context)
        bound_s = max(step_bytes / bandwidth, step_flops / peak)
        achieved_s = tpot_ms / 1e3
        result["decode"] = {
            "mean_batch": batch, "mean_context_tokens": context,
            "bytes_per_step": step_bytes, "flops_per_step": step_flops,
            "bound": "memory" if step_bytes / bandwidth >= step_flops / peak else "compute",
            "bound_step_ms": bound_s * 1e3, "achieved_step_ms": tpot_ms,
            "bound_tokens_per_s": batch / bound_s, "achieved_tokens_per_s": batch / achieved_s,
            "achieved_bandwidth_bytes_per_s": step_bytes / achieved_s,
            "fraction_of_limit": bound_s / achieved_s,
        }
    ttft_min_ms = summary["ttft_ms"]["min"]
    if ttft_min_ms and mean_input:
        prefill_bytes = shape.prefill_bytes(mean_input)
        prefill_flops = shape.prefill_flops(mean_input)
        bound_s = max(prefill_bytes / bandwidth, prefill_flops / peak)
        achieved_s = ttft_min_ms / 1e3
        result["prefill"] = {
            "prompt_tokens": mean_input, "bytes": prefill_bytes, "flops": prefill_flops,
            "bound": "memory" if prefill_bytes / bandwidth >= prefill_flops / peak else "compute",
            "bound_ms": bound_s * 1e3, "achieved_ms": ttft_min_ms,
            "bound_tokens_per_s": mean_input / bound_s, "achieved_tokens_per_s": mean_input / achieved_s,
            "achieved_flops_per_s": prefill_flops / achieved_s,
            "fraction_of_limit": bound_s / achieved_s,
        }
    return result

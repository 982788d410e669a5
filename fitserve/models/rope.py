"""Rotary position embeddings, computed exactly as transformers computes them.

Greedy decoding must be token-identical to transformers in float32, so the arithmetic here
follows theirs step for step: inverse frequencies in float32 from an int64 arange, the
llama3 smoothing of the low frequencies, angles as `position * inv_freq` (elementwise, not a
matmul), cos/sin duplicated over both halves of the head, and a cast to the activation
dtype before rotating.
"""

from __future__ import annotations

import math
from typing import Any

import torch


_TABLE_CHUNK_ROWS = 128
"""Positions per `forward` call when `RotaryEmbedding.table` grows."""
_TABLE_GROWTH_ROWS = 4096
"""`RotaryEmbedding.table` covers positions in multiples of this many."""


def compute_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None
) -> torch.Tensor:
    """Float32 inverse frequencies [head_dim // 2] for rope types default, linear, llama3 and
    dynamic (which is plain rope within max_position_embeddings, see ModelConfig.rope_scaling).

    Always computed on the CPU (callers move it): under a `torch.device("meta")` context, as
    models are built, meta arithmetic would import torch._dynamo, 1.5 s of startup."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float) / head_dim
    inv_freq = 1.0 / (rope_theta**exponents)
    if rope_scaling is None:
        return inv_freq
    rope_type = rope_scaling["rope_type"]
    factor = rope_scaling["factor"]
    if rope_type == "dynamic":
        return inv_freq
    if rope_type == "linear":
        # Dividing the frequencies is the same as dividing the positions by `factor`.
        return inv_freq / factor
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, rope_scaling)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, rope_scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1 long-context scaling: stretch long wavelengths by `factor`, keep short ones,
    and blend smoothly in between (so the model keeps its short-range precision)."""
    factor = rope_scaling["factor"]
    low_freq_factor = rope_scaling["low_freq_factor"]
    high_freq_factor = rope_scaling["high_freq_factor"]
    original_context = rope_scaling["original_max_position_embeddings"]
    low_freq_wavelen = original_context / low_freq_factor
    high_freq_wavelen = original_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """Turns token positions into the (cos, sin) pair every attention layer rotates with.

    Computed once per forward pass for the whole token stream, not per layer. `inv_freq`
    stays float32 whatever dtype the model is cast to (as in transformers, where it is
    computed after the dtype is chosen), so call `reset_inv_freq` after casting.
    """

    def __init__(self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.register_buffer(
            "inv_freq", compute_inv_freq(head_dim, rope_theta, rope_scaling), persistent=False
        )
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_inv_freq(self, device: torch.device | None = None) -> None:
        """Recompute the float32 frequencies (after `to(dtype)` or `to_empty` clobbered them)."""
        inv_freq = compute_inv_freq(self.head_dim, self.rope_theta, self.rope_scaling)
        self.inv_freq = inv_freq.to(device or self.inv_freq.device)
        self._tables = {}

    def table(self, dtype: torch.dtype, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) of positions 0 .. at least num_positions - 1, each [rows, head_dim] in
        `dtype`, for callers that look rows up instead of computing them (the fused CPU decode
        step: six small ops per step, ~0.1 ms right after the weights have streamed through
        the caches, become a row copy). Grown in whole chunks as positions grow.

        Row p holds exactly what `forward` returns for a single position p: each chunk of
        `_TABLE_CHUNK_ROWS` rows is one `forward` call, small enough that torch computes it
        serially in whole vectors, as it computes a single token's row.
        """
        tables = self._tables
        cached = tables.get(dtype)
        if cached is not None and cached[0].shape[0] >= num_positions:
            return cached
        rows = -(-max(num_positions, 1) // _TABLE_GROWTH_ROWS) * _TABLE_GROWTH_ROWS
        start = 0 if cached is None else cached[0].shape[0]
        parts = [] if cached is None else [cached]
        for first in range(start, rows, _TABLE_CHUNK_ROWS):
            positions = torch.arange(first, first + _TABLE_CHUNK_ROWS, device=self.inv_freq.device)
            parts.append(self.forward(positions, dtype))
        table = (torch.cat([cos for cos, _ in parts]), torch.cat([sin for _, sin in parts]))
        tables[dtype] = table
        return table

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [num_tokens, head_dim] in `dtype`."""
        angles = positions[:, None].float() * self.inv_freq[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [num_tokens, num_heads, head_dim] by per-token angles (the "rotate half" layout
    Hugging Face checkpoints are trained with, not interleaved pairs)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]

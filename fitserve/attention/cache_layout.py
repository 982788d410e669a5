"""What one layer's paged KV cache is made of, and the int8 format's definition.

A layer's cache is `LayerKVCache`: a key and a value tensor of the paged layout
`[num_blocks, block_size, num_kv_heads, head_dim]` (see `fitserve.attention.metadata`), plus,
for the int8 format, one float32 scale per cached token per KV head for each of them
(`[num_blocks, block_size, num_kv_heads]`). A float cache has no scales.

Why one scale per token per KV head: a token's K and V are computed once, by the step that
adds the token, and never change afterwards; a per-token scale is therefore known at the
moment of writing (no re-quantizing of earlier tokens, as a per-block or per-channel scale
would need when a later token widens the range), chunked prefill and prefix caching see the
same bytes whichever step wrote them, and a block can be freed, reused or shared without
touching any other. Per KV head rather than per token: heads differ in magnitude by an order
of magnitude or more, so one scale for all heads would waste most of the small heads' 8 bits.
The price is 4 bytes per token per head beside `head_dim` bytes of int8: 1.88x the tokens of
a bfloat16 cache at head_dim 64, 1.94x at 128 (float32 scales keep the arithmetic exact in
every kernel; a float16 scale would gain 3% capacity).

Kernels read the int8 values as they are and apply the scales in their arithmetic: the key
scale multiplies each score (q . k_int8 * scale_k), the value scale multiplies each
probability before the value sum. An int8 value is exact in bfloat16 and float32, so the
kernels can reuse their float paths on the integers without a dequantized copy.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

SCALE_DTYPE = torch.float32
"""dtype of the int8 format's scales."""

INT8_MAX = 127.0


class LayerKVCache(NamedTuple):
    """One layer's cache. Indexing [0] / [1] gives the key / value tensor, as the plain
    (key, value) pairs did; the scales are None for a float cache."""

    key: torch.Tensor
    value: torch.Tensor
    key_scales: torch.Tensor | None = None
    value_scales: torch.Tensor | None = None

    @property
    def is_int8(self) -> bool:
        return self.key_scales is not None


def cache_element_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the K/V tensors for a `--kv-cache-dtype` value."""
    return torch.int8 if kv_cache_dtype == "int8" else model_dtype


def bytes_per_token_per_head(head_dim: int, kv_cache_dtype: str, model_dtype: torch.dtype) -> int:
    """Bytes one token's K (or V) of one KV head takes, scale included."""
    if kv_cache_dtype == "int8":
        return head_dim + torch.empty((), dtype=SCALE_DTYPE).element_size()
    return head_dim * torch.empty((), dtype=model_dtype).element_size()


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., head_dim] -> (int8 values, float32 scales [...]) with x ~ values * scale.

    Symmetric, over the head's dims in float32: values = round_half_even(x * (127 / max|x|)),
    scale = max|x| / 127 (an all-zero head gets scale 0 and zeros). Every kernel that writes
    the cache computes exactly these float32 operations, so all paths store the same bytes.
    """
    x_float = x.float()
    amax = x_float.abs().amax(dim=-1)
    # Tensor-by-tensor divisions: `127 / amax` on a tensor is computed as reciprocal(amax) * 127,
    # one rounding more than the kernels' single division.
    int8_max = torch.full_like(amax, INT8_MAX)
    inverse = torch.where(amax > 0, int8_max / amax, torch.zeros_like(amax))
    values = torch.round(x_float * inverse[..., None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, amax / int8_max


def dequantize_int8(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 values * scales (for tests and error measurements; the kernels never call it)."""
    return values.float() * scales.float()[..., None]

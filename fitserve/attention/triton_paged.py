"""Paged attention with Triton kernels: the GPU path (the torch path stays the reference).

Exposes the same two functions as `torch_paged`, with the same signatures and semantics:

* `write_kv` stores the new tokens' K/V into their cache slots with one small kernel (one
  program per token) instead of two `index_copy_` launches.
* `paged_attention` sends decode-only batches to the split-KV decode kernel
  (`triton_decode`) and every other batch to the tiled prefill kernel (`triton_prefill`).

Neither function synchronises with the GPU: grid sizes come from the metadata's host lists
and everything else (sequence lengths, block tables) is read on the device.

With an int8 cache (`key_scales`/`value_scales` given) `write_kv` quantizes each token's
heads as it stores them and the attention kernels read the int8 values with their scales
(see fitserve.attention.triton_int8 and the kernels' INT8_KV paths).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.attention.metadata import AttentionMetadata
from fitserve.attention.triton_common import check_device, next_power_of_2, padded_head_dim
from fitserve.attention.triton_decode import decode_attention
from fitserve.attention.triton_int8 import int8_inverse_and_scale, int8_values
from fitserve.attention.triton_prefill import prefill_attention

__all__ = ["paged_attention", "write_kv"]


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_scales_ptr,
    value_scales_ptr,
    slot_mapping_ptr,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    BLOCK_SIZE: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    # A negative slot marks a padding token (e.g. a batch padded for a CUDA graph): no write.
    if slot < 0:
        return
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < NUM_KV_HEADS)[:, None] & (dims < HEAD_DIM)[None, :]
    cache_offsets = (
        (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_token
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    key = tl.load(
        key_ptr + token * stride_key_token + heads[:, None] * stride_key_head + dims[None, :],
        mask=mask,
    )
    value = tl.load(
        value_ptr + token * stride_value_token + heads[:, None] * stride_value_head + dims[None, :],
        mask=mask,
    )
    if INT8_KV:
        # One scale per (slot, head): the scales are [num_blocks, block_size, num_kv_heads].
        scale_offsets = slot * NUM_KV_HEADS + heads
        key = key.to(tl.float32)
        value = value.to(tl.float32)
        key_inverse, key_scale = int8_inverse_and_scale(tl.max(tl.abs(key), axis=1))
        value_inverse, value_scale = int8_inverse_and_scale(tl.max(tl.abs(value), axis=1))
        tl.store(key_cache_ptr + cache_offsets, int8_values(key, key_inverse), mask=mask)
        tl.store(value_cache_ptr + cache_offsets, int8_values(value, value_inverse), mask=mask)
        tl.store(key_scales_ptr + scale_offsets, key_scale, mask=heads < NUM_KV_HEADS)
        tl.store(value_scales_ptr + scale_offsets, value_scale, mask=heads < NUM_KV_HEADS)
    else:
        tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> None:
    """Store the new tokens' K and V ([num_tokens, num_kv_heads, head_dim]) into their slots;
    into an int8 cache quantized per token and head, the scales beside them (contiguous
    [num_blocks, block_size, num_kv_heads]).

    `key`/`value` may be strided views (e.g. slices of a fused QKV projection); only their
    last dimension must be contiguous. Tokens whose slot is negative are skipped.
    """
    check_device(key)
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = key_cache.shape[1]
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    if num_tokens == 0:
        return
    int8 = key_scales is not None and value_scales is not None
    if int8:
        assert key_scales.is_contiguous() and value_scales.is_contiguous()
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
        key_scales if int8 else key_cache,  # never read for a float cache
        value_scales if int8 else value_cache,
        slot_mapping,
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        BLOCK_SIZE=block_size,
        NUM_KV_HEADS=num_kv_heads,
        HEADS_PAD=next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        INT8_KV=int8,
        num_warps=4,
        enable_fp_fusion=False,  # the quantizing store rounds as torch does (triton_int8)
    )


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached context.

    `query` is [num_tokens, num_heads, head_dim]; K/V of the new tokens must already be in
    the cache (see `write_kv`). Returns a new contiguous [num_tokens, num_heads, head_dim].
    An int8 cache is read as stored, with its scales.
    """
    if metadata.is_decode_only:
        return decode_attention(query, key_cache, value_cache, metadata, scale,
                                key_scales=key_scales, value_scales=value_scales)
    return prefill_attention(query, key_cache, value_cache, metadata, scale,
                             key_scales=key_scales, value_scales=value_scales)

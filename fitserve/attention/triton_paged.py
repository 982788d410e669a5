"""Paged attention with Triton kernels: the GPU path (the torch path stays the reference).

Exposes the same two functions as `torch_paged`, with the same signatures and semantics:

* `write_kv` stores the new tokens' K/V into their cache slots with one small kernel (one
  program per token) instead of two `index_copy_` launches.
* `paged_attention` sends decode-only batches to the split-KV decode kernel
  (`triton_decode`) and every other batch to the tiled prefill kernel (`triton_prefill`).

Neither function synchronises with the GPU: grid sizes come from the metadata's host lists
and everything else (sequence lengths, block tables) is read on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.attention.metadata import AttentionMetadata
from fitserve.attention.triton_common import check_device, next_power_of_2, padded_head_dim
from fitserve.attention.triton_decode import decode_attention
from fitserve.attention.triton_prefill import prefill_attention

__all__ = ["paged_attention", "write_kv"]


@triton.jit
def _write_kv_kernel(
    key_ptr,
    value_ptr,
    key_cache_ptr,
    value_cache_ptr,
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
    tl.store(key_cache_ptr + cache_offsets, key.to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value.to(value_cache_ptr.dtype.element_ty), mask=mask)


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store the new tokens' K and V ([num_tokens, num_kv_heads, head_dim]) into their slots.

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
    _write_kv_kernel[(num_tokens,)](
        key,
        value,
        key_cache,
        value_cache,
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
        num_warps=4,
    )


def paged_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of the new tokens over their sequences' cached context.

    `query` is [num_tokens, num_heads, head_dim]; K/V of the new tokens must already be in
    the cache (see `write_kv`). Returns a new contiguous [num_tokens, num_heads, head_dim].
    """
    if metadata.is_decode_only:
        return decode_attention(query, key_cache, value_cache, metadata, scale)
    return prefill_attention(query, key_cache, value_cache, metadata, scale)

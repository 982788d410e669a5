"""Triton attention for batches with prefills: fresh prompts, chunked prefills and decodes mixed.

Design: the query rows of one sequence are cut into tiles and each tile is one program per
KV head. A tile packs `BLOCK_Q` consecutive new tokens times the `GROUP_SIZE` query heads that
share the program's KV head into the `BLOCK_M` rows of one `tl.dot` (row r is token r //
GROUP_SIZE, head r % GROUP_SIZE), so grouped-query attention loads each K/V tile once for the
whole group, and a decode that lands in a mixed batch still fills GROUP_SIZE rows instead of one.

The program walks its sequence's paged blocks from position 0 up to the causal limit of the
tile's last token, so the cached prefix of a chunked prefill (which may end mid-block) and the
chunk's own keys (already written by `write_kv`) are read the same way. Row r sees key
positions <= its own position `seq_len - query_len + token`. Softmax is online in float32.

Grid without a host sync: the tiles of all sequences are numbered in one flat range. Sequence
i's tiles start at `query_start_loc[i] // BLOCK_Q + i`, a non-decreasing function of i that
leaves at least `ceil(query_len_i / BLOCK_Q)` numbers for each sequence, so the grid only needs
the token count (`num_tokens // BLOCK_Q + num_seqs` tiles) and each program finds its sequence
by binary search over `query_start_loc` on the device. Numbers past a sequence's last tile
exit immediately.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitserve.attention.metadata import AttentionMetadata
from fitserve.attention.triton_common import (
    LOG2E,
    MIN_DOT_SIZE,
    check_device,
    dot_input_precision,
    is_interpreting,
    next_power_of_2,
    padded_head_dim,
)
from fitserve.attention.triton_int8 import int8_operand, load_token_scales


def default_prefill_tiles(dtype: torch.dtype, head_dim: int, group_size: int) -> tuple[int, int]:
    """(query rows per program, key tokens per inner iteration) for these operands.

    64 x 64 is a typical FlashAttention-2 tile for 16-bit head_dim <= 128 on Ampere/Hopper
    (about 48 KiB of shared memory with Triton's software pipelining). float32 operands use
    exact (non-tensor-core) products whose staging buffers are twice as large (over 110 KiB
    at 64 x 64, more than consumer GPUs have), so they get 32 x 32; float32 is the
    correctness path, not the fast one. Wider heads halve the key tile for the same reason.
    """
    block_m, tile_n = (64, 64) if dtype != torch.float32 else (32, 32)
    if head_dim > 128:
        tile_n //= 2
    return max(block_m, next_power_of_2(group_size)), max(tile_n, MIN_DOT_SIZE)


@triton.jit
def _find_sequence(query_start_loc_ptr, tile_index, num_seqs, BLOCK_Q: tl.constexpr):
    """Index of the last sequence whose first tile number is <= tile_index (binary search)."""
    low: tl.int32 = 0
    high: tl.int32 = num_seqs
    while low < high:
        middle = (low + high) // 2
        first_tile = tl.load(query_start_loc_ptr + middle) // BLOCK_Q + middle
        if first_tile <= tile_index:
            low = middle + 1
        else:
            high = middle
    return low - 1


@triton.jit
def _prefill_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_scales_ptr,
    value_scales_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    output_ptr,
    scale_log2,
    num_seqs,
    stride_query_token,
    stride_query_head,
    stride_cache_block,
    stride_cache_token,
    stride_cache_head,
    stride_scale_block,
    stride_scale_token,
    stride_table_seq,
    stride_output_token,
    stride_output_head,
    BLOCK_SIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    tile_index = tl.program_id(0)
    kv_head = tl.program_id(1)

    seq_index = _find_sequence(query_start_loc_ptr, tile_index, num_seqs, BLOCK_Q)
    query_start = tl.load(query_start_loc_ptr + seq_index)
    query_len = tl.load(query_start_loc_ptr + seq_index + 1) - query_start
    first_token = (tile_index - (query_start // BLOCK_Q + seq_index)) * BLOCK_Q
    if first_token >= query_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq_index)
    context_len = seq_len - query_len  # tokens cached before this step

    rows = tl.arange(0, BLOCK_M)
    row_token = first_token + rows // GROUP_SIZE
    row_head = kv_head * GROUP_SIZE + rows % GROUP_SIZE
    # Rows past BLOCK_Q * GROUP_SIZE exist only when GROUP_SIZE does not divide BLOCK_M.
    row_valid = (rows < BLOCK_Q * GROUP_SIZE) & (row_token < query_len)
    row_position = context_len + row_token
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM

    query = tl.load(
        query_ptr
        + (query_start + row_token)[:, None] * stride_query_token
        + row_head[:, None] * stride_query_head
        + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST_OPERANDS:
        query = query.to(tl.float32)

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    accumulator = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq_index * stride_table_seq

    # Keys past the last token of this tile are invisible to every row of it.
    kv_end = tl.minimum(seq_len, context_len + first_token + BLOCK_Q)
    # Every row (padding rows too) sees position 0, which is in the first tile, so the
    # running max is finite from then on and fully masked later tiles add exp2(-inf) = 0.
    for tile_start in range(0, kv_end, TILE_N):
        positions = tile_start + tl.arange(0, TILE_N)
        position_valid = positions < kv_end
        block_numbers = tl.load(
            block_table_row + positions // BLOCK_SIZE, mask=position_valid, other=0
        ).to(tl.int64)
        token_offsets = (
            block_numbers * stride_cache_block
            + (positions % BLOCK_SIZE) * stride_cache_token
            + kv_head * stride_cache_head
        )
        kv_mask = position_valid[:, None] & dim_valid[None, :]
        keys = tl.load(key_cache_ptr + token_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0)
        values = tl.load(
            value_cache_ptr + token_offsets[:, None] + dims[None, :], mask=kv_mask, other=0.0
        )
        if INT8_KV:
            # The integers as they are (exact in 16-bit floats) in the query's dtype for the
            # dot; each token's key scale multiplies its scores.
            keys = int8_operand(keys, query_ptr.dtype.element_ty, UPCAST_OPERANDS)
            key_scales, value_scales = load_token_scales(
                key_scales_ptr, value_scales_ptr, block_numbers, positions, position_valid, kv_head,
                stride_scale_block, stride_scale_token, BLOCK_SIZE,
            )
        if UPCAST_OPERANDS:
            keys = keys.to(tl.float32)

        scores = tl.dot(query, tl.trans(keys), input_precision=INPUT_PRECISION)
        if INT8_KV:
            scores = scores * (key_scales[None, :] * scale_log2)
        else:
            scores = scores * scale_log2
        visible = (positions[None, :] <= row_position[:, None]) & position_valid[None, :]
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        if INT8_KV:  # value scales after the running sum; the query's dtype for the dot
            probs_operand = (probs * value_scales[None, :]).to(query_ptr.dtype.element_ty)
            values = int8_operand(values, query_ptr.dtype.element_ty, UPCAST_OPERANDS)
        else:
            probs_operand = probs.to(value_cache_ptr.dtype.element_ty)
        if UPCAST_OPERANDS:
            probs_operand = probs_operand.to(tl.float32)
            values = values.to(tl.float32)
        accumulator = accumulator * rescale[:, None] + tl.dot(
            probs_operand, values, input_precision=INPUT_PRECISION
        )
        running_max = new_max

    output = accumulator / running_sum[:, None]
    tl.store(
        output_ptr
        + (query_start + row_token)[:, None] * stride_output_token
        + row_head[:, None] * stride_output_head
        + dims[None, :],
        output.to(output_ptr.dtype.element_ty),
        mask=row_valid[:, None] & dim_valid[None, :],
    )


def prefill_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    block_m: int | None = None,
    tile_n: int | None = None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of any mix of prefills, chunked prefills and decodes.

    `block_m` and `tile_n` (powers of two >= 16; default `default_prefill_tiles`) are exposed
    for tests and benchmarks; `block_m` must be at least the GQA group size so a tile holds
    one whole token.
    """
    check_device(query)
    num_tokens, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group_size = num_heads // num_kv_heads
    default_block_m, default_tile_n = default_prefill_tiles(query.dtype, head_dim, group_size)
    block_m = block_m or default_block_m
    tile_n = tile_n or default_tile_n
    assert block_m >= max(group_size, MIN_DOT_SIZE) and tile_n >= MIN_DOT_SIZE
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    int8 = key_scales is not None and value_scales is not None
    assert not int8 or (key_scales.stride() == value_scales.stride() and key_scales.stride(-1) == 1)
    if query.stride(-1) != 1:
        query = query.contiguous()
    output = torch.empty((num_tokens, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return output

    block_q = block_m // group_size
    num_tiles = num_tokens // block_q + metadata.num_seqs
    _prefill_kernel[(num_tiles, num_kv_heads)](
        query,
        key_cache,
        value_cache,
        key_scales if int8 else key_cache,  # never read for a float cache
        value_scales if int8 else value_cache,
        metadata.block_tables,
        metadata.seq_lens,
        metadata.query_start_loc,
        output,
        scale * LOG2E,
        metadata.num_seqs,
        query.stride(0),
        query.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        key_scales.stride(0) if int8 else 0,
        key_scales.stride(1) if int8 else 0,
        metadata.block_tables.stride(0),
        output.stride(0),
        output.stride(1),
        BLOCK_SIZE=block_size,
        GROUP_SIZE=group_size,
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=padded_head_dim(head_dim),
        BLOCK_M=block_m,
        BLOCK_Q=block_q,
        TILE_N=tile_n,
        UPCAST_OPERANDS=is_interpreting(),
        INPUT_PRECISION=dot_input_precision(query.dtype),
        INT8_KV=int8,
        num_warps=4,
    )
    return output

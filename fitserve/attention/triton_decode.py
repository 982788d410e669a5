"""Triton decode attention over a paged KV cache (one query token per sequence).

Design (flash-decoding): a decode step reads every cached token of every sequence once and
does almost no arithmetic per byte, so its speed is the memory bandwidth the kernel manages to
use. Two things keep the GPU's memory system busy:

* **Split the context.** With a small batch there are only `num_seqs * num_kv_heads`
  (sequence, KV head) pairs, far fewer than a GPU has streaming multiprocessors. Each
  sequence's context is cut into partitions of `partition_size` tokens and each partition is
  its own program, which writes a partial result: the running max and sum of its softmax and
  its un-normalised output. A second, tiny kernel combines the partials of each head.
  When the longest context fits in one partition the first kernel writes the final output
  directly and the reduce kernel is not launched. The partition size is picked per batch
  (`choose_partition_size`) so that the grid has a few programs per multiprocessor.
* **Read K/V once per KV-head group.** One program serves all query heads that share a KV
  head (grouped-query attention). The group's query rows form the M side of a `tl.dot`
  (padded to 16, the smallest tile `tl.dot` accepts), so K/V tiles are loaded once and the
  extra rows cost only idle tensor-core lanes, not memory traffic.

Within a partition the program walks the context in tiles of `TILE_N` tokens. A tile may
span several paged blocks: each token looks up its own block number in the block table, so
the tile size is independent of the cache's block size. Softmax is online (running max and
sum) in float32, using exp2 with the scale pre-multiplied by log2(e).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from fitserve.attention.metadata import AttentionMetadata
from fitserve.attention.triton_common import (
    LOG2E,
    MIN_DOT_SIZE,
    cdiv,
    check_device,
    dot_input_precision,
    is_interpreting,
    next_power_of_2,
    padded_head_dim,
)
from fitserve.attention.triton_int8 import int8_operand, load_token_scales

DEFAULT_PARTITION_SIZE = 256
"""Tokens per decode program when the device's size is unknown (the CPU interpreter)."""

MIN_PARTITION_SIZE = 64
"""Below this, the partial results a program writes (and the reduce kernel reads back) are
over a tenth of the K/V bytes it reads."""

MAX_PARTITION_SIZE = 512
"""Keeps long contexts split even in big batches, so that one long sequence among short ones
is not left to a single program while the rest of the GPU idles."""

REDUCE_CHUNK = 32
"""Partitions the reduce kernel combines per loop iteration."""

PROGRAMS_PER_MULTIPROCESSOR = 4
"""Enough resident programs per SM to keep loads in flight while others wait on memory.
Tune with benchmarks/gpu_kernels.py, which sweeps fixed partition sizes against the choice."""


@functools.cache
def _multiprocessor_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def choose_partition_size(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, device: torch.device
) -> int:
    """Context tokens per decode program: the smallest power of two (within
    [MIN_PARTITION_SIZE, MAX_PARTITION_SIZE]) that needs no more than
    PROGRAMS_PER_MULTIPROCESSOR programs per SM, so small batches with long contexts still
    fill the GPU while big batches do not pay for many partial results."""
    if device.type != "cuda":
        return DEFAULT_PARTITION_SIZE
    device_index = device.index if device.index is not None else torch.cuda.current_device()
    wanted_programs = PROGRAMS_PER_MULTIPROCESSOR * _multiprocessor_count(device_index)
    tokens_per_program = cdiv(num_seqs * num_kv_heads * max_seq_len, wanted_programs)
    return min(MAX_PARTITION_SIZE, max(MIN_PARTITION_SIZE, next_power_of_2(tokens_per_program)))



def default_decode_tile_n(dtype: torch.dtype, head_dim: int) -> int:
    """Tokens loaded per inner-loop iteration: 64 (4 blocks of 16, 2 of 32) for 16-bit heads
    up to 128 wide; half that for float32 or wider heads, whose exact (non-tensor-core) dots
    stage twice the bytes in shared memory (see `default_prefill_tiles`)."""
    tile_n = 64 if dtype != torch.float32 else 32
    return tile_n // 2 if head_dim > 128 else tile_n


@triton.jit
def _decode_partition_kernel(
    query_ptr,
    key_cache_ptr,
    value_cache_ptr,
    key_scales_ptr,
    value_scales_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    output_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_out_ptr,
    scale_log2,
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
    max_num_partitions,
    BLOCK_SIZE: tl.constexpr,
    GROUP_SIZE: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    TILE_N: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    SINGLE_PARTITION: tl.constexpr,
    UPCAST_OPERANDS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    INT8_KV: tl.constexpr,
):
    seq_index = tl.program_id(0)
    kv_head = tl.program_id(1)
    partition = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + seq_index)
    partition_start = partition * PARTITION_SIZE
    # The grid is sized for the longest sequence; shorter ones have nothing to do here.
    if partition_start >= seq_len:
        return
    partition_end = tl.minimum(partition_start + PARTITION_SIZE, seq_len)

    group_rows = tl.arange(0, GROUP_PAD)
    row_valid = group_rows < GROUP_SIZE
    query_heads = kv_head * GROUP_SIZE + group_rows
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_valid = dims < HEAD_DIM

    query = tl.load(
        query_ptr
        + seq_index * stride_query_token
        + query_heads[:, None] * stride_query_head
        + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if UPCAST_OPERANDS:
        query = query.to(tl.float32)

    running_max = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([GROUP_PAD], dtype=tl.float32)
    accumulator = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], dtype=tl.float32)
    block_table_row = block_tables_ptr + seq_index * stride_table_seq

    # Every tile starts before partition_end <= seq_len, so each holds at least one real token
    # and the running max is finite after the first tile (no inf - inf).
    for tile_start in range(partition_start, partition_end, TILE_N):
        positions = tile_start + tl.arange(0, TILE_N)
        position_valid = positions < partition_end
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
        scores = tl.where(position_valid[None, :], scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        rescale = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * rescale + tl.sum(probs, axis=1)
        # Probabilities are rounded to the cache dtype for the second matmul, as FlashAttention
        # and the torch reference do; over an int8 cache, to the query's dtype after the value
        # scales (the running sum above has taken them unscaled).
        if INT8_KV:
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

    store_mask = row_valid[:, None] & dim_valid[None, :]
    if SINGLE_PARTITION:
        output = accumulator / running_sum[:, None]
        tl.store(
            output_ptr
            + seq_index * stride_output_token
            + query_heads[:, None] * stride_output_head
            + dims[None, :],
            output.to(output_ptr.dtype.element_ty),
            mask=store_mask,
        )
    else:
        # Partials are laid out [num_seqs, num_heads, max_num_partitions(, HEAD_DIM_PAD)].
        seq_heads_start = seq_index * GROUP_SIZE * tl.num_programs(1)
        partial_index = (seq_heads_start + query_heads) * max_num_partitions + partition
        tl.store(partial_max_ptr + partial_index, running_max, mask=row_valid)
        tl.store(partial_sum_ptr + partial_index, running_sum, mask=row_valid)
        tl.store(
            partial_out_ptr + partial_index[:, None] * HEAD_DIM_PAD + dims[None, :],
            accumulator,
            mask=row_valid[:, None],
        )


@triton.jit
def _decode_reduce_kernel(
    seq_lens_ptr,
    partial_max_ptr,
    partial_sum_ptr,
    partial_out_ptr,
    output_ptr,
    stride_output_token,
    stride_output_head,
    max_num_partitions,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr,
    PARTITION_SIZE: tl.constexpr,
    PARTITION_CHUNK: tl.constexpr,
):
    seq_index = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq_index)
    num_partitions = tl.cdiv(seq_len, PARTITION_SIZE)
    row_start = (seq_index * tl.num_programs(1) + head) * max_num_partitions
    chunk = tl.arange(0, PARTITION_CHUNK)

    # Partials are read in fixed-size chunks so that very long contexts (hundreds of
    # partitions) do not need a register tile per partition. First pass: the global max.
    chunk_max = tl.full([PARTITION_CHUNK], float("-inf"), dtype=tl.float32)
    for chunk_start in range(0, num_partitions, PARTITION_CHUNK):
        partitions = chunk_start + chunk
        partial_max = tl.load(
            partial_max_ptr + row_start + partitions, mask=partitions < num_partitions, other=float("-inf")
        )
        chunk_max = tl.maximum(chunk_max, partial_max)
    global_max = tl.max(chunk_max, axis=0)

    # Second pass: each partition's sum and output were relative to its own max; rescale them
    # to the global one and add them up.
    dims = tl.arange(0, HEAD_DIM_PAD)
    weighted_sums = tl.zeros([PARTITION_CHUNK], dtype=tl.float32)
    weighted_out = tl.zeros([HEAD_DIM_PAD], dtype=tl.float32)
    for chunk_start in range(0, num_partitions, PARTITION_CHUNK):
        partitions = chunk_start + chunk
        valid = partitions < num_partitions
        partial_max = tl.load(partial_max_ptr + row_start + partitions, mask=valid, other=float("-inf"))
        partial_sum = tl.load(partial_sum_ptr + row_start + partitions, mask=valid, other=0.0)
        partial_out = tl.load(
            partial_out_ptr + (row_start + partitions)[:, None] * HEAD_DIM_PAD + dims[None, :],
            mask=valid[:, None],
            other=0.0,
        )
        weights = tl.exp2(partial_max - global_max)
        weighted_sums += partial_sum * weights
        weighted_out += tl.sum(partial_out * weights[:, None], axis=0)
    output = weighted_out / tl.sum(weighted_sums, axis=0)
    tl.store(
        output_ptr + seq_index * stride_output_token + head * stride_output_head + dims,
        output.to(output_ptr.dtype.element_ty),
        mask=dims < HEAD_DIM,
    )


def decode_attention(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    metadata: AttentionMetadata,
    scale: float,
    partition_size: int | None = None,
    tile_n: int | None = None,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one new token per sequence ([num_seqs, num_heads, head_dim]).

    `partition_size` and `tile_n` are exposed so tests can force long contexts across many
    programs with small shapes, and benchmarks can sweep them; both must be powers of two
    and `partition_size` a multiple of `tile_n` (so no tile straddles two partitions).
    They default to `choose_partition_size` and `default_decode_tile_n`.
    """
    check_device(query)
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    partition_size = partition_size or choose_partition_size(
        num_seqs, num_kv_heads, metadata.grid_seq_len, query.device
    )
    tile_n = tile_n or min(default_decode_tile_n(query.dtype, head_dim), partition_size)
    _, block_size, num_kv_heads, _ = key_cache.shape
    assert partition_size % tile_n == 0 and tile_n >= MIN_DOT_SIZE, (
        f"partition_size ({partition_size}) must be a multiple of tile_n ({tile_n}) >= {MIN_DOT_SIZE}"
    )
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    int8 = key_scales is not None and value_scales is not None
    assert not int8 or (key_scales.stride() == value_scales.stride() and key_scales.stride(-1) == 1)
    if query.stride(-1) != 1:
        query = query.contiguous()
    group_size = num_heads // num_kv_heads
    head_dim_pad = padded_head_dim(head_dim)
    output = torch.empty((num_seqs, num_heads, head_dim), dtype=query.dtype, device=query.device)
    if num_seqs == 0:
        return output

    # Sized for grid_seq_len, not the real longest context, when a CUDA graph replays this
    # launch (see AttentionMetadata.max_seq_len_bound); surplus programs return at once.
    max_num_partitions = cdiv(metadata.grid_seq_len, partition_size)
    single_partition = max_num_partitions == 1
    if single_partition:
        # Never read: the partition kernel writes the output directly.
        partial_max = partial_sum = partial_out = output
    else:
        partial_shape = (num_seqs, num_heads, max_num_partitions)
        partial_max = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
        partial_sum = torch.empty(partial_shape, dtype=torch.float32, device=query.device)
        partial_out = torch.empty(
            (*partial_shape, head_dim_pad), dtype=torch.float32, device=query.device
        )

    _decode_partition_kernel[(num_seqs, num_kv_heads, max_num_partitions)](
        query,
        key_cache,
        value_cache,
        key_scales if int8 else key_cache,  # never read for a float cache
        value_scales if int8 else value_cache,
        metadata.block_tables,
        metadata.seq_lens,
        output,
        partial_max,
        partial_sum,
        partial_out,
        scale * LOG2E,
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
        max_num_partitions,
        BLOCK_SIZE=block_size,
        GROUP_SIZE=group_size,
        GROUP_PAD=max(MIN_DOT_SIZE, next_power_of_2(group_size)),
        HEAD_DIM=head_dim,
        HEAD_DIM_PAD=head_dim_pad,
        TILE_N=tile_n,
        PARTITION_SIZE=partition_size,
        SINGLE_PARTITION=single_partition,
        UPCAST_OPERANDS=is_interpreting(),
        INPUT_PRECISION=dot_input_precision(query.dtype),
        INT8_KV=int8,
        num_warps=4,
    )
    if not single_partition:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            metadata.seq_lens,
            partial_max,
            partial_sum,
            partial_out,
            output,
            output.stride(0),
            output.stride(1),
            max_num_partitions,
            HEAD_DIM=head_dim,
            HEAD_DIM_PAD=head_dim_pad,
            PARTITION_SIZE=partition_size,
            PARTITION_CHUNK=min(REDUCE_CHUNK, next_power_of_2(max_num_partitions)),
            num_warps=4,
        )
    return output

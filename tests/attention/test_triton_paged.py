"""The Triton paged-attention kernels agree with the torch reference (`torch_paged`).

Without a GPU the kernels run in Triton's CPU interpreter (see conftest.py), so shapes are
small: a few KV heads, head_dim 32, contexts up to ~300 tokens. Partition and tile sizes are
shrunk where a test needs a long context to span many programs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import pytest
import torch

from fitserve.attention import torch_paged, triton_decode
from fitserve.attention.metadata import AttentionMetadata
from fitserve.attention.triton_common import check_device
from fitserve.attention.triton_decode import decode_attention
from fitserve.attention.triton_paged import paged_attention, write_kv
from fitserve.attention.triton_prefill import prefill_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NUM_KV_HEADS = 2
HEAD_DIM = 32


@dataclass
class PagedBatch:
    """A filled paged KV cache plus the metadata and queries of one step over it."""

    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    metadata: AttentionMetadata
    scale: float


def make_metadata(
    query_lens: list[int], seq_lens: list[int], block_size: int, generator: torch.Generator
) -> tuple[AttentionMetadata, int]:
    """Metadata whose sequences own shuffled, non-contiguous blocks; returns it and num_blocks."""
    blocks_per_seq = [-(-seq_len // block_size) for seq_len in seq_lens]
    # Spare blocks so that the used ones are scattered through the cache.
    num_blocks = sum(blocks_per_seq) + 3
    shuffled = torch.randperm(num_blocks, generator=generator).tolist()
    max_blocks = max(blocks_per_seq)
    block_tables = torch.zeros((len(seq_lens), max_blocks + 1), dtype=torch.int32)
    slots: list[int] = []
    for seq_index, (query_len, seq_len) in enumerate(zip(query_lens, seq_lens, strict=True)):
        table = [shuffled.pop() for _ in range(blocks_per_seq[seq_index])]
        block_tables[seq_index, : len(table)] = torch.tensor(table, dtype=torch.int32)
        for position in range(seq_len - query_len, seq_len):
            slots.append(table[position // block_size] * block_size + position % block_size)
    query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    metadata = AttentionMetadata(
        query_start_loc=query_start_loc.to(DEVICE),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        block_tables=block_tables.to(DEVICE),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=DEVICE),
        query_lens_cpu=list(query_lens),
        seq_lens_cpu=list(seq_lens),
        block_size=block_size,
    )
    return metadata, num_blocks


def make_batch(
    query_lens: list[int],
    seq_lens: list[int],
    *,
    block_size: int = 16,
    group_size: int = 1,
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> PagedBatch:
    """Random queries over a random paged cache (every slot filled, including unused ones)."""
    generator = torch.Generator().manual_seed(seed)
    metadata, num_blocks = make_metadata(query_lens, seq_lens, block_size, generator)
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, head_dim)
    key_cache = torch.randn(cache_shape, generator=generator).to(DEVICE, dtype)
    value_cache = torch.randn(cache_shape, generator=generator).to(DEVICE, dtype)
    query = torch.randn(
        (sum(query_lens), NUM_KV_HEADS * group_size, head_dim), generator=generator
    ).to(DEVICE, dtype)
    return PagedBatch(query, key_cache, value_cache, metadata, scale=head_dim**-0.5)


def reference(batch: PagedBatch) -> torch.Tensor:
    """torch_paged's answer computed in float32, whatever the batch dtype."""
    return torch_paged.paged_attention(
        batch.query.float().contiguous(),
        batch.key_cache.float(),
        batch.value_cache.float(),
        batch.metadata,
        batch.scale,
    )


def assert_close_to_reference(actual: torch.Tensor, batch: PagedBatch) -> None:
    """float32 must agree to rounding; 16-bit inputs to what their rounding allows."""
    assert actual.dtype == batch.query.dtype
    assert actual.shape == batch.query.shape
    tolerance = 2e-5 if batch.query.dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.float(), reference(batch), atol=tolerance, rtol=tolerance)


# ---------------------------------------------------------------------------------- write_kv


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_stores_strided_inputs_into_random_slots_like_torch(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    num_blocks, block_size, num_tokens = 6, 16, 21
    slot_mapping = torch.randperm(num_blocks * block_size, generator=generator)[:num_tokens]
    # K and V as slices of one fused projection output, as the model produces them.
    fused = torch.randn((num_tokens, 3 * NUM_KV_HEADS * HEAD_DIM), generator=generator).to(dtype)
    kv_width = NUM_KV_HEADS * HEAD_DIM
    key = fused[:, kv_width : 2 * kv_width].view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    value = fused[:, 2 * kv_width :].view(num_tokens, NUM_KV_HEADS, HEAD_DIM)
    cache_shape = (num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM)
    initial_keys = torch.randn(cache_shape, generator=generator).to(dtype)
    initial_values = torch.randn(cache_shape, generator=generator).to(dtype)

    expected_keys, expected_values = initial_keys.clone(), initial_values.clone()
    torch_paged.write_kv(key, value, expected_keys, expected_values, slot_mapping)
    key_cache, value_cache = initial_keys.to(DEVICE), initial_values.to(DEVICE)
    write_kv(key.to(DEVICE), value.to(DEVICE), key_cache, value_cache, slot_mapping.to(DEVICE))

    assert torch.equal(key_cache.cpu(), expected_keys)
    assert torch.equal(value_cache.cpu(), expected_values)


def test_write_kv_skips_tokens_with_negative_slots() -> None:
    key = torch.ones((3, NUM_KV_HEADS, HEAD_DIM), device=DEVICE)
    key_cache = torch.zeros((2, 16, NUM_KV_HEADS, HEAD_DIM), device=DEVICE)
    value_cache = torch.zeros_like(key_cache)
    slot_mapping = torch.tensor([5, -1, 20], dtype=torch.int64, device=DEVICE)

    write_kv(key, 2 * key, key_cache, value_cache, slot_mapping)

    written = key_cache.flatten(0, 1).abs().sum(dim=(1, 2)).nonzero().flatten().tolist()
    assert written == [5, 20]
    assert torch.equal(value_cache.flatten(0, 1)[[5, 20]], 2 * key[[0, 2]])


# ------------------------------------------------------------------------------------ decode

RAGGED_DECODE_LENS = [1, 15, 16, 17, 33, 300]


# Every GQA ratio once and each block size twice keeps the interpreter time down; the kernels do
# not couple the two (block size only enters the per-token block lookup).
RATIO_AND_BLOCK_SIZE = [(1, 16), (2, 32), (4, 16), (8, 32)]


@pytest.mark.parametrize(("group_size", "block_size"), RATIO_AND_BLOCK_SIZE)
def test_decode_ragged_batch_matches_torch(group_size: int, block_size: int) -> None:
    # 300 tokens span two 256-token partitions of the default split, so this also checks the
    # reduce kernel and sequences that own fewer partitions than the grid has.
    batch = make_batch(
        [1] * len(RAGGED_DECODE_LENS), RAGGED_DECODE_LENS, block_size=block_size, group_size=group_size
    )
    assert batch.metadata.is_decode_only
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    assert_close_to_reference(actual, batch)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_long_context_split_across_many_partitions(dtype: torch.dtype) -> None:
    seq_lens = [300, 17, 129, 64]
    batch = make_batch([1] * len(seq_lens), seq_lens, group_size=4, dtype=dtype, seed=2)
    # 64-token partitions of two 32-token tiles: the 300-token context spans 5 programs, 129
    # spans 3 (one token in the last), 64 exactly fills one.
    actual = decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
        partition_size=64, tile_n=32,
    )
    assert_close_to_reference(actual, batch)


def test_decode_reduce_combines_partials_over_several_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # The reduce kernel walks partitions in chunks (32 on a GPU); with chunks of 2, the 5
    # partitions of a 300-token context take three iterations, the last one half empty.
    monkeypatch.setattr(triton_decode, "REDUCE_CHUNK", 2)
    batch = make_batch([1, 1, 1], [300, 17, 129], group_size=2, seed=13)
    actual = decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
        partition_size=64, tile_n=32,
    )
    assert_close_to_reference(actual, batch)


def test_decode_grid_sized_for_a_bound_gives_the_same_output() -> None:
    # A captured CUDA graph launches the grid for max_model_len at every step: partitions past a
    # sequence's real context must add nothing, and padding rows (context 1) must stay finite.
    seq_lens = [300, 17, 1, 129]
    batch = make_batch([1] * len(seq_lens), seq_lens, group_size=2, seed=5)
    exact = decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
        partition_size=64, tile_n=32,
    )
    batch.metadata.max_seq_len_bound = 1024  # 16 partitions of 64; the longest context uses 5
    bounded = decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
        partition_size=64, tile_n=32,
    )
    assert torch.equal(bounded, exact)
    assert_close_to_reference(bounded, batch)


def test_partition_size_spreads_small_batches_and_caps_large_ones(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(triton_decode, "_multiprocessor_count", lambda device_index: 132)  # H100
    gpu = torch.device("cuda", 0)

    def num_programs(num_seqs: int, context_len: int) -> int:
        partition_size = triton_decode.choose_partition_size(num_seqs, 8, context_len, gpu)
        return num_seqs * 8 * -(-context_len // partition_size)

    # Batch 1 with 8 KV heads has 8 (sequence, head) pairs: the context is split until every
    # SM has work.
    assert num_programs(1, 8192) >= 132
    assert triton_decode.choose_partition_size(1, 8, 512, gpu) == triton_decode.MIN_PARTITION_SIZE
    assert triton_decode.choose_partition_size(64, 8, 8192, gpu) == triton_decode.MAX_PARTITION_SIZE
    cpu = torch.device("cpu")
    assert triton_decode.choose_partition_size(1, 8, 8192, cpu) == triton_decode.DEFAULT_PARTITION_SIZE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_short_contexts_in_one_partition_with_16_bit_inputs(dtype: torch.dtype) -> None:
    # No context exceeds one partition, so the kernel writes its output without a reduce pass.
    seq_lens = [1, 15, 16, 17, 33]
    batch = make_batch([1] * len(seq_lens), seq_lens, block_size=32, group_size=2, dtype=dtype, seed=3)
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    assert_close_to_reference(actual, batch)


@pytest.mark.parametrize("head_dim", [16, 128, 80])
def test_decode_head_dims(head_dim: int) -> None:
    # 80 is not a power of two: the kernel pads the head to 128 lanes and masks the rest. One
    # 70-token context over 32-token partitions exercises both kernels at each width.
    batch = make_batch([1], [70], group_size=2, head_dim=head_dim, seed=4)
    actual = decode_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale,
        partition_size=32, tile_n=16,
    )
    assert_close_to_reference(actual, batch)


def test_decode_reads_a_strided_query_view() -> None:
    batch = make_batch([1, 1, 1], [5, 40, 19], group_size=4, seed=5)
    # The query as a slice of a wider fused-projection row.
    fused = torch.randn((3, 2 * batch.query.shape[1], HEAD_DIM), device=DEVICE)
    fused[:, : batch.query.shape[1]] = batch.query
    batch.query = fused[:, : batch.query.shape[1]]
    assert not batch.query.is_contiguous()
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    assert_close_to_reference(actual, batch)


# ----------------------------------------------------------------------------------- prefill

# A fresh 20-token prompt, a chunked prefill of 13 tokens whose 21 cached tokens end mid-block,
# two decodes (one right after a block boundary), and a one-token prompt.
MIXED_QUERY_LENS = [20, 13, 1, 1, 1]
MIXED_SEQ_LENS = [20, 34, 17, 33, 1]


@pytest.mark.parametrize(("group_size", "block_size"), RATIO_AND_BLOCK_SIZE)
def test_prefill_mixed_batch_matches_torch(group_size: int, block_size: int) -> None:
    batch = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, block_size=block_size, group_size=group_size, seed=6)
    assert not batch.metadata.is_decode_only
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    assert_close_to_reference(actual, batch)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_mixed_batch_with_16_bit_inputs(dtype: torch.dtype) -> None:
    batch = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, group_size=4, dtype=dtype, seed=7)
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    assert_close_to_reference(actual, batch)


@pytest.mark.parametrize("group_size", [1, 4])
def test_prefill_small_tiles_cross_many_blocks(group_size: int) -> None:
    # 16-row tiles and 16-token key tiles: a 24-token chunk over a 66-token prefix spans several
    # query tiles, each looping over several key tiles and blocks with the causal edge inside.
    batch = make_batch([24, 3, 1], [90, 3, 9], group_size=group_size, seed=8)
    actual = prefill_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale, block_m=16, tile_n=16
    )
    assert_close_to_reference(actual, batch)


def test_prefill_group_size_that_does_not_divide_the_tile() -> None:
    # 3 query heads per KV head (as in some Qwen models): 16-row tiles hold 5 tokens + 1 spare row.
    batch = make_batch([11, 4], [11, 30], group_size=3, seed=9)
    actual = prefill_attention(
        batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale, block_m=16, tile_n=16
    )
    assert_close_to_reference(actual, batch)


@pytest.mark.parametrize("head_dim", [16, 128, 80])
def test_prefill_head_dims(head_dim: int) -> None:
    batch = make_batch([9, 1], [25, 18], group_size=2, head_dim=head_dim, seed=10)
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    assert_close_to_reference(actual, batch)


# -------------------------------------------------------------------------------- end to end


def test_write_then_attend_over_a_step_matches_torch_path() -> None:
    """One model step's attention done entirely by the Triton path equals the torch path."""
    batch = make_batch(MIXED_QUERY_LENS, MIXED_SEQ_LENS, group_size=2, seed=11)
    generator = torch.Generator().manual_seed(12)
    num_tokens = batch.query.shape[0]
    new_key = torch.randn((num_tokens, NUM_KV_HEADS, HEAD_DIM), generator=generator).to(DEVICE)
    new_value = torch.randn((num_tokens, NUM_KV_HEADS, HEAD_DIM), generator=generator).to(DEVICE)
    torch_keys, torch_values = batch.key_cache.clone(), batch.value_cache.clone()

    write_kv(new_key, new_value, batch.key_cache, batch.value_cache, batch.metadata.slot_mapping)
    torch_paged.write_kv(new_key, new_value, torch_keys, torch_values, batch.metadata.slot_mapping)
    actual = paged_attention(batch.query, batch.key_cache, batch.value_cache, batch.metadata, batch.scale)
    expected = torch_paged.paged_attention(batch.query, torch_keys, torch_values, batch.metadata, batch.scale)

    torch.testing.assert_close(actual, expected, atol=2e-5, rtol=2e-5)


def test_cpu_tensors_without_the_interpreter_get_an_actionable_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="'torch' attention backend"):
        check_device(torch.zeros(1))

"""The description of one model step's batch that every attention backend reads.

A step runs a flat stream of `num_tokens` new tokens that belong to `num_seqs` sequences,
laid out sequence after sequence. Sequence `i` owns the query rows
`query_start_loc[i]:query_start_loc[i+1]`; those new tokens sit at the end of its context,
so after the step its context is `seq_lens[i]` tokens long and the first new token has
position `seq_lens[i] - query_len_i`. A decode is simply a sequence with one new token.

The paged KV cache of one layer is two tensors, `key_cache` and `value_cache`, each of shape
`[num_blocks, block_size, num_kv_heads, head_dim]`. Token `j` of a sequence lives in block
`block_tables[i, j // block_size]` at offset `j % block_size`; the flat slot index
`block * block_size + offset` of each new token is in `slot_mapping`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Batch layout for paged attention (see the module docstring for the conventions)."""

    query_start_loc: torch.Tensor
    """[num_seqs + 1] int32: cumulative query lengths, starting at 0."""
    seq_lens: torch.Tensor
    """[num_seqs] int32: context length of each sequence including this step's tokens."""
    block_tables: torch.Tensor
    """[num_seqs, max_blocks_per_seq] int32, padded with 0 past each sequence's blocks."""
    slot_mapping: torch.Tensor
    """[num_tokens] int64: where each new token's K and V are written."""
    query_lens_cpu: list[int]
    """Host copy of the query lengths, so the portable path can loop without syncing."""
    seq_lens_cpu: list[int]
    """Host copy of `seq_lens`."""
    block_size: int
    max_seq_len_bound: int | None = None
    """When set, an upper bound on every context length that kernels size their launch grids
    for instead of the batch's actual longest context. A captured CUDA graph replays the same
    grid at every step, so its metadata carries the longest context a graph serves here;
    programs past a sequence's real length return at once."""

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)

    @property
    def max_query_len(self) -> int:
        return max(self.query_lens_cpu, default=0)

    @property
    def max_seq_len(self) -> int:
        return max(self.seq_lens_cpu, default=0)

    @property
    def grid_seq_len(self) -> int:
        """The context length launch grids are sized for (see `max_seq_len_bound`)."""
        return self.max_seq_len_bound if self.max_seq_len_bound is not None else self.max_seq_len

    @property
    def is_decode_only(self) -> bool:
        """True when every sequence adds exactly one token (the common, latency-critical step)."""
        return self.max_query_len == 1

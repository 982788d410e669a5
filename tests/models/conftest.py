"""Tiny random checkpoints of each supported architecture, and a by-hand paged KV batch.

Everything here is float32 and a few hundred kilobytes, so each model test runs in about
a second on a busy CPU. The reference for every output is transformers, loaded from the
same files.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from fitserve.attention.metadata import AttentionMetadata
from fitserve.engine.runner import allocate_kv_cache

from tests.tiny_models import VARIANTS, random_token_ids, write_tiny_checkpoint


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes a `variant` argument runs once per supported architecture variant."""
    if "variant" in metafunc.fixturenames:
        metafunc.parametrize("variant", list(VARIANTS))


@pytest.fixture
def make_checkpoint(tmp_path: Path) -> Callable[..., Path]:
    """Write a tiny random checkpoint: make_checkpoint(variant, dtype=..., **config overrides)."""
    counter = iter(range(1000))

    def make(variant: str, dtype: str = "float32", **overrides: Any) -> Path:
        return write_tiny_checkpoint(tmp_path / f"{variant}-{dtype}-{next(counter)}", variant, dtype, **overrides)

    return make


@dataclass
class PagedSequence:
    """One sequence's tokens and blocks in a hand-built paged KV cache."""

    token_ids: list[int]
    block_table: list[int]
    num_computed_tokens: int = 0


@dataclass
class PagedKVCache:
    """A small paged cache plus the bookkeeping a scheduler would do, for building steps."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int = 4
    num_blocks: int = 40
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    kv_cache_dtype: str = "auto"
    """"int8": int8 K/V with per-token scales (fitserve.attention.cache_layout)."""
    free_blocks: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.kv_caches = allocate_kv_cache(self.num_layers, self.num_blocks, self.block_size, self.num_kv_heads,
                                           self.head_dim, self.dtype, self.device, self.kv_cache_dtype)
        # Shuffled so every sequence's blocks are scattered: catches any contiguity assumption.
        self.free_blocks = list(range(1, self.num_blocks))
        random.Random(0).shuffle(self.free_blocks)

    def new_sequence(self, token_ids: list[int]) -> PagedSequence:
        num_blocks = -(-len(token_ids) // self.block_size)
        table = [self.free_blocks.pop() for _ in range(num_blocks)]
        return PagedSequence(token_ids, table)

    def step(
        self, scheduled: list[tuple[PagedSequence, int]]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """(input_ids, positions, metadata) running `num_new` more tokens of each sequence.

        Advances each sequence's num_computed_tokens, as the engine would after the step.
        """
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        for sequence, num_new in scheduled:
            start = sequence.num_computed_tokens
            for position in range(start, start + num_new):
                input_ids.append(sequence.token_ids[position])
                positions.append(position)
                block = sequence.block_table[position // self.block_size]
                slots.append(block * self.block_size + position % self.block_size)
            query_lens.append(num_new)
            seq_lens.append(start + num_new)
            sequence.num_computed_tokens += num_new
        max_blocks = max(len(sequence.block_table) for sequence, _ in scheduled)
        block_tables = torch.zeros((len(scheduled), max_blocks), dtype=torch.int32)
        for row, (sequence, _) in enumerate(scheduled):
            block_tables[row, : len(sequence.block_table)] = torch.tensor(sequence.block_table)
        query_start_loc = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
        device = self.device
        metadata = AttentionMetadata(
            query_start_loc=query_start_loc.to(device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=block_tables.to(device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )
        return torch.tensor(input_ids, device=device), torch.tensor(positions, device=device), metadata


@pytest.fixture
def paged_cache_for() -> Callable[..., PagedKVCache]:
    """paged_cache_for(model_config, dtype=float32, device=cpu) -> an empty PagedKVCache."""

    def make(config: Any, dtype: torch.dtype = torch.float32, device: torch.device = torch.device("cpu")) -> PagedKVCache:
        return PagedKVCache(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim, dtype=dtype, device=device
        )

    return make


@pytest.fixture
def token_ids() -> Callable[[int, int], list[int]]:
    """token_ids(length, seed) -> reproducible random prompt ids (no special tokens)."""
    return random_token_ids

"""Decode steps replayed from CUDA graphs, one graph per padded batch size.

Why: a decode step of a small model on a GPU is hundreds of tiny kernel launches. Launched
one by one from Python, the CPU time per step exceeds the GPU time, and the GPU idles
between kernels. A CUDA graph records the whole forward pass (KV write, attention, every
projection, the logits) once and replays it with a single launch.

What a graph needs, and how this module provides it:

* **Fixed shapes.** Graphs are captured for a ladder of batch sizes (1, 2, 4, 8, then
  multiples of 8 up to max_num_seqs, as vLLM does); a step with n decodes runs the smallest
  graph of size >= n, its extra rows padded.
* **Fixed addresses.** Inputs live in static buffers that every step overwrites in place:
  token ids, positions, KV slots, context lengths and block tables. The logits come back in
  a static output tensor.
* **Fixed launch grids.** The attention metadata carries `max_seq_len_bound` = `max_seq_len`
  (the engine's `max_seq_len_to_capture`, at most max_model_len), so the decode kernel is
  launched for the longest context a graph serves; programs past a sequence's real length
  return at once. Those programs still launch, so the bound is kept near the contexts in
  use rather than a model's whole window (Qwen3's 40960 positions would launch five times the
  programs of 8192 every layer); a step with a longer context runs eagerly (`covers`).
* **Harmless padding.** Padding rows decode token 0 at position 0 with a context of one
  token in a spare KV block that no request owns (`padding_block`): their K/V writes land
  there, their attention reads only there, and their logits are never read.

The sampler runs after the replay on the static logits: its per-request settings (seeds,
penalties, stop rules) change every step.

With `use_cuda_graphs=False` the same static-buffer code runs eagerly. That is how the CPU
tests check the padding and buffer logic against the ordinary path, and it is what a GPU
runs with `--enforce-eager` only if asked to (the engine then skips this module entirely).
"""

from __future__ import annotations

import logging

import torch

from fitserve.attention.cache_layout import LayerKVCache
from fitserve.attention.metadata import AttentionMetadata

logger = logging.getLogger("fitserve")


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to (and including) max_num_seqs."""
    sizes = [size for size in (1, 2, 4) if size < max_num_seqs]
    sizes.extend(range(8, max_num_seqs, 8))
    sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphs:
    """Runs decode-only steps through static buffers, replaying captured CUDA graphs."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[LayerKVCache],
        block_size: int,
        max_seq_len: int,
        max_num_seqs: int,
        padding_block: int,
        device: torch.device,
        use_cuda_graphs: bool,
        bounded_grids: bool | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.max_seq_len = max_seq_len
        self.padding_block = padding_block
        self.device = device
        self.use_cuda_graphs = use_cuda_graphs
        # Kernels size their grids for max_seq_len, as a captured graph must; eager runs
        # need not, except to test exactly what a graph would launch.
        self.bounded_grids = use_cuda_graphs if bounded_grids is None else bounded_grids
        self.batch_sizes = graph_batch_sizes(max_num_seqs)
        self.max_batch_size = self.batch_sizes[-1]
        self.max_blocks_per_seq = -(-max_seq_len // block_size)

        size = self.max_batch_size
        padding_slot = padding_block * block_size
        self._input_ids = torch.zeros(size, dtype=torch.long, device=device)
        self._positions = torch.zeros(size, dtype=torch.long, device=device)
        self._slot_mapping = torch.full((size,), padding_slot, dtype=torch.long, device=device)
        self._seq_lens = torch.ones(size, dtype=torch.int32, device=device)
        self._block_tables = torch.full(
            (size, self.max_blocks_per_seq), padding_block, dtype=torch.int32, device=device
        )
        self._query_start_loc = torch.arange(size + 1, dtype=torch.int32, device=device)
        # The block tables are filled on the host row by row through numpy (a slice assignment
        # per row: ~0.4 ms for 256 rows, against ~2.6 ms for a torch tensor per row) and copied
        # over in one transfer; pinned on a GPU so that the copy is asynchronous. Rewriting the
        # buffer at the next step is safe: sampling has waited for this step (and its copy).
        self._host_block_tables = torch.full(
            (size, self.max_blocks_per_seq), padding_block, dtype=torch.int32,
            pin_memory=device.type == "cuda",
        )
        self._host_block_tables_view = self._host_block_tables.numpy()
        # What each host row holds: the block list it was copied from and how many entries.
        # A request's block list only ever grows (appended to) until it is replaced, so a row
        # whose list is the same object needs only its new entries: most steps, none.
        self._row_sources: list[list[int] | None] = [None] * size
        self._row_lengths: list[int] = [0] * size
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._logits: dict[int, torch.Tensor] = {}

    def covers(self, num_seqs: int, longest_context: int) -> bool:
        """Whether a decode step of `num_seqs` sequences, the longest `longest_context` tokens
        long (the new one included), can run here."""
        return num_seqs <= self.max_batch_size and longest_context <= self.max_seq_len

    def padded_batch_size(self, num_seqs: int) -> int | None:
        """The graph size a step of `num_seqs` decodes runs at, or None if none is large enough."""
        for size in self.batch_sizes:
            if size >= num_seqs:
                return size
        return None

    def _metadata(self, batch_size: int, seq_lens_cpu: list[int] | None = None) -> AttentionMetadata:
        """Views of the static buffers for one batch size.

        Captured graphs size their grids from `max_seq_len_bound` and never look at the host
        lists; the eager path passes the real lengths so the torch backend can use them.
        """
        return AttentionMetadata(
            query_start_loc=self._query_start_loc[: batch_size + 1],
            seq_lens=self._seq_lens[:batch_size],
            block_tables=self._block_tables[:batch_size],
            slot_mapping=self._slot_mapping[:batch_size],
            query_lens_cpu=[1] * batch_size,
            seq_lens_cpu=seq_lens_cpu if seq_lens_cpu is not None else [1] * batch_size,
            block_size=self.block_size,
            max_seq_len_bound=self.max_seq_len if self.bounded_grids else None,
        )

    def _forward(self, batch_size: int, metadata: AttentionMetadata) -> torch.Tensor:
        hidden_states = self.model(
            self._input_ids[:batch_size], self._positions[:batch_size], self.kv_caches, metadata
        )
        return self.model.compute_logits(hidden_states)

    @torch.inference_mode()
    def capture(self) -> None:
        """Record one graph per batch size (largest first, so the smaller ones reuse its memory
        pool). Each size runs once eagerly first, which compiles the Triton kernels outside
        the capture."""
        if not self.use_cuda_graphs:
            return
        pool = None
        for batch_size in reversed(self.batch_sizes):
            metadata = self._metadata(batch_size)
            self._forward(batch_size, metadata)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._logits[batch_size] = self._forward(batch_size, metadata)
            pool = graph.pool()
            self._graphs[batch_size] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.batch_sizes)

    @torch.inference_mode()
    def run(
        self,
        input_ids: list[int],
        positions: list[int],
        slot_mapping: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
    ) -> torch.Tensor:
        """Logits [num_seqs, vocab_size] (the model's dtype) of one decode token per sequence."""
        num_seqs = len(input_ids)
        batch_size = self.padded_batch_size(num_seqs)
        if batch_size is None:
            raise ValueError(f"{num_seqs} decodes exceed the largest graph ({self.max_batch_size})")
        padding = batch_size - num_seqs
        padding_slot = self.padding_block * self.block_size
        # One host tensor per buffer, copied in place: the graph reads these exact addresses.
        self._input_ids[:batch_size].copy_(torch.tensor(input_ids + [0] * padding), non_blocking=True)
        self._positions[:batch_size].copy_(torch.tensor(positions + [0] * padding), non_blocking=True)
        self._slot_mapping[:batch_size].copy_(
            torch.tensor(slot_mapping + [padding_slot] * padding), non_blocking=True
        )
        self._seq_lens[:batch_size].copy_(
            torch.tensor(seq_lens + [1] * padding, dtype=torch.int32), non_blocking=True
        )
        # Entries past a row's own blocks may hold an earlier step's blocks: attention never
        # reads past a sequence's length. Padding rows need their first entry only.
        host_tables = self._host_block_tables_view
        sources, lengths = self._row_sources, self._row_lengths
        for row, table in enumerate(block_tables):
            length = len(table)
            if sources[row] is table:
                if lengths[row] != length:
                    host_tables[row, lengths[row] : length] = table[lengths[row] :]
                    lengths[row] = length
            else:
                host_tables[row, :length] = table
                sources[row], lengths[row] = table, length
        host_tables[num_seqs:batch_size, 0] = self.padding_block
        for row in range(num_seqs, batch_size):
            sources[row] = None
        width = max(len(table) for table in block_tables)
        self._block_tables[:batch_size, :width].copy_(
            self._host_block_tables[:batch_size, :width], non_blocking=True
        )

        if batch_size in self._graphs:
            self._graphs[batch_size].replay()
            return self._logits[batch_size][:num_seqs]
        metadata = self._metadata(batch_size, seq_lens + [1] * padding)
        return self._forward(batch_size, metadata)[:num_seqs]

"""Turns a scheduled batch into tensors, runs the model once, and samples.

The runner owns the KV-cache tensors (allocated once at start-up) and knows nothing about
who should run: it executes exactly what the scheduler decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fitserve.attention.cache_layout import SCALE_DTYPE, LayerKVCache, bytes_per_token_per_head, cache_element_dtype
from fitserve.attention.metadata import AttentionMetadata
from fitserve.engine.decode_graphs import DecodeGraphs
from fitserve.engine.request import Request
from fitserve.engine.sampler import Sampler, compute_prompt_logprobs
from fitserve.engine.scheduler import SchedulerOutput
from fitserve.outputs import PositionLogprobs


def kv_cache_bytes_per_block(
    num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
    kv_cache_dtype: str = "auto",
) -> int:
    """K and V of every layer for one block of tokens (an int8 cache's scales included)."""
    per_head = bytes_per_token_per_head(head_dim, kv_cache_dtype, dtype)
    return 2 * num_layers * block_size * num_kv_heads * per_head


def allocate_kv_cache(
    num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
    dtype: torch.dtype, device: torch.device, kv_cache_dtype: str = "auto",
) -> list[LayerKVCache]:
    """One allocation for the whole cache (and one for an int8 cache's scales), viewed as a
    `LayerKVCache` per layer. `dtype` is the model's; `kv_cache_dtype` "int8" stores K/V as
    int8 with float32 scales [num_blocks, block_size, num_kv_heads] beside them."""
    element_dtype = cache_element_dtype(kv_cache_dtype, dtype)
    storage = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim, dtype=element_dtype,
                          device=device)
    if element_dtype != torch.int8:
        return [LayerKVCache(storage[layer, 0], storage[layer, 1]) for layer in range(num_layers)]
    scales = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, dtype=SCALE_DTYPE, device=device)
    return [LayerKVCache(storage[layer, 0], storage[layer, 1], scales[layer, 0], scales[layer, 1])
            for layer in range(num_layers)]


@dataclass
class RunnerOutput:
    sampled: dict[str, tuple[int, PositionLogprobs | None]] = field(default_factory=dict)
    """request id -> (next token, its log-probs if asked) for requests that completed their tokens."""
    prompt_logprobs: dict[str, list[PositionLogprobs]] = field(default_factory=dict)
    """request id -> log-probs of the prompt positions computed in this step."""


@dataclass
class _PromptLogprobRows:
    """Hidden-state rows of one request whose logits score prompt tokens in this step."""

    request: Request
    first_token_row: int
    """Row in the step's flat token stream; row r scores the prompt token after it."""
    targets: list[int]


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        kv_caches: list[LayerKVCache],
        block_size: int,
        device: torch.device,
        sampler: Sampler,
        decode_graphs: DecodeGraphs | None = None,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = sampler
        self.decode_graphs = decode_graphs
        """When set, decode-only steps that fit its largest batch run through it (CUDA graphs)."""

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        block_size = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        query_lens: list[int] = []
        seq_lens: list[int] = []
        block_tables: list[list[int]] = []
        sample_token_rows: list[int] = []
        sample_requests: list[Request] = []
        prompt_rows: list[_PromptLogprobRows] = []

        for item in scheduler_output.scheduled:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            token_offset = len(input_ids)
            if item.num_new_tokens == 1:
                input_ids.append(request.token_id(start))
                positions.append(start)
                slot_mapping.append(request.block_ids[start // block_size] * block_size + start % block_size)
            else:
                input_ids.extend(request.all_token_ids[start:end])
                positions.extend(range(start, end))
                block_ids = request.block_ids
                slot_mapping.extend(
                    block_ids[position // block_size] * block_size + position % block_size
                    for position in range(start, end)
                )
            query_lens.append(item.num_new_tokens)
            seq_lens.append(end)
            block_tables.append(request.block_ids)
            if request.sampling_params.prompt_logprobs is not None:
                rows = _prompt_logprob_rows(request, start, end, token_offset)
                if rows is not None:
                    prompt_rows.append(rows)
            if item.completes_sequence:
                sample_token_rows.append(token_offset + item.num_new_tokens - 1)
                sample_requests.append(request)

        output = RunnerOutput()
        graphs = self.decode_graphs
        if (graphs is not None and not prompt_rows and len(sample_requests) == len(input_ids) == len(query_lens)
                and graphs.covers(len(input_ids), max(seq_lens))):
            # Every scheduled request decodes one token and samples it: the graph's case.
            logits = graphs.run(input_ids, positions, slot_mapping, seq_lens, block_tables)
            self._sample(logits, sample_requests, output)
            return output

        metadata = self._build_metadata(query_lens, seq_lens, block_tables, slot_mapping)
        input_tensor = torch.tensor(input_ids, dtype=torch.long, device=self.device)
        position_tensor = torch.tensor(positions, dtype=torch.long, device=self.device)
        hidden_states = self.model(input_tensor, position_tensor, self.kv_caches, metadata)

        # Logits only where needed: prompt rows that are scored, then one row per sampled request.
        logit_rows: list[int] = []
        for rows in prompt_rows:
            logit_rows.extend(range(rows.first_token_row, rows.first_token_row + len(rows.targets)))
        num_prompt_logit_rows = len(logit_rows)
        logit_rows.extend(sample_token_rows)
        if not logit_rows:
            return output
        if len(logit_rows) == hidden_states.shape[0] and logit_rows == list(range(len(logit_rows))):
            logit_hidden = hidden_states  # a decode step samples every row, in order: no copy
        else:
            row_index = torch.tensor(logit_rows, dtype=torch.long, device=self.device)
            logit_hidden = hidden_states.index_select(0, row_index)
        logits = self.model.compute_logits(logit_hidden)

        first = 0
        for rows in prompt_rows:
            chunk = logits[first : first + len(rows.targets)]
            first += len(rows.targets)
            output.prompt_logprobs[rows.request.request_id] = compute_prompt_logprobs(
                chunk, rows.targets, rows.request.sampling_params.prompt_logprobs or 0
            )
        if sample_requests:
            self._sample(logits[num_prompt_logit_rows:], sample_requests, output)
        return output

    def _sample(self, logits: torch.Tensor, requests: list[Request], output: RunnerOutput) -> None:
        sampler_output = self.sampler.sample(logits, requests)
        for request, token_id, logprobs in zip(requests, sampler_output.token_ids, sampler_output.logprobs):
            output.sampled[request.request_id] = (token_id, logprobs)

    def _build_metadata(
        self, query_lens: list[int], seq_lens: list[int], block_tables: list[list[int]], slot_mapping: list[int]
    ) -> AttentionMetadata:
        max_blocks = max(len(table) for table in block_tables)
        padded = [table + [0] * (max_blocks - len(table)) for table in block_tables]
        query_start = [0]
        for length in query_lens:
            query_start.append(query_start[-1] + length)
        device = self.device
        return AttentionMetadata(
            query_start_loc=torch.tensor(query_start, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device),
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.long, device=device),
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            block_size=self.block_size,
        )



def _prompt_logprob_rows(request: Request, start: int, end: int, token_offset: int) -> _PromptLogprobRows | None:
    """Rows of this chunk that score prompt tokens not scored before (position p scores p + 1).

    `request.prompt_logprobs` already holds entries for positions 0..k (entry 0 is None), so
    after a preemption the recomputed prefix is not scored twice.
    """
    first_position = max(start, len(request.prompt_logprobs) - 1)
    last_position = min(end, request.num_prompt_tokens - 1)
    if first_position >= last_position:
        return None
    targets = request.prompt_token_ids[first_position + 1 : last_position + 1]
    return _PromptLogprobRows(request, token_offset + first_position - start, targets)

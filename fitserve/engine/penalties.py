"""Penalties that push the model away from tokens it already produced.

Repetition penalty (CTRL / Hugging Face style, over prompt and output) divides a seen
token's positive logit and multiplies a negative one; presence and frequency penalties
(OpenAI style, over output only) subtract a constant once per seen token and per occurrence.

Only the logits of tokens that occurred change, so the work is done on those positions alone:
each row's token ids are shifted by row * vocab into one flat index over the whole batch,
gathered, penalised and written back. That costs O(tokens seen) instead of several passes over
a [rows, vocab] count tensor, which matters with 128k-token vocabularies on a CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fitserve.engine.request import Request
from fitserve.sampling_params import SamplingParams


def apply_penalties(
    logits: torch.Tensor,
    requests: list[Request],
    token_tensors: TokenTensors | None = None,
) -> torch.Tensor:
    """Logits after repetition (prompt + output), then presence/frequency (output only).

    Returns a new tensor; rows whose request has no penalty come back unchanged. Which
    penalties run is decided from the Python values, so no device sync is needed for it.
    `token_tensors` lets the sampler reuse device copies of the token ids between steps.
    """
    device = logits.device
    num_columns = logits.shape[-1]
    token_tensors = token_tensors or TokenTensors(device)
    penalised = logits.clone()
    flat_logits = penalised.view(-1)

    repetition_rows = [
        row
        for row, request in enumerate(requests)
        if request.sampling_params.repetition_penalty != 1.0
    ]
    if repetition_rows:
        seen_ids = [
            torch.cat(
                [
                    token_tensors.prompt_ids(requests[row], num_columns),
                    token_tensors.output_ids(requests[row], num_columns),
                ]
            )
            for row in repetition_rows
        ]
        flat_index, element_rows = _flat_index(seen_ids, repetition_rows, num_columns, device)
        penalty = _per_row(requests, lambda params: params.repetition_penalty, device)[element_rows]
        seen_logits = flat_logits[flat_index]
        # A token seen several times appears several times in the index; every copy writes
        # the same value, so it is penalised once, as in transformers.
        flat_logits[flat_index] = torch.where(
            seen_logits > 0, seen_logits / penalty, seen_logits * penalty
        )

    additive_rows = [
        row
        for row, request in enumerate(requests)
        if request.sampling_params.frequency_penalty != 0.0
        or request.sampling_params.presence_penalty != 0.0
    ]
    if additive_rows:
        output_ids = [token_tensors.output_ids(requests[row], num_columns) for row in additive_rows]
        flat_index, _ = _flat_index(output_ids, additive_rows, num_columns, device)
        if flat_index.numel() > 0:
            unique_index, counts = torch.unique(flat_index, return_counts=True)
            rows_of_unique = unique_index // num_columns
            frequency = _per_row(requests, lambda params: params.frequency_penalty, device)[
                rows_of_unique
            ]
            presence = _per_row(requests, lambda params: params.presence_penalty, device)[
                rows_of_unique
            ]
            flat_logits[unique_index] = (
                flat_logits[unique_index] - frequency * counts.float() - presence
            )
    return penalised


def _flat_index(
    token_tensors: list[torch.Tensor], rows: list[int], num_columns: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's token ids shifted to row * vocab + id, concatenated; plus each element's row."""
    lengths = torch.tensor([ids.numel() for ids in token_tensors], dtype=torch.long, device=device)
    element_rows = torch.repeat_interleave(
        torch.tensor(rows, dtype=torch.long, device=device), lengths
    )
    flat_index = torch.cat(token_tensors) + element_rows * num_columns
    return flat_index, element_rows


def _per_row(
    requests: list[Request], value_of: Callable[[SamplingParams], float], device: torch.device
) -> torch.Tensor:
    """One float32 value per row of the batch, read from each request's sampling params."""
    return torch.tensor(
        [value_of(request.sampling_params) for request in requests],
        dtype=torch.float32,
        device=device,
    )


class TokenTensors:
    """Device copies of requests' prompt and output ids for the penalties.

    Rebuilding them from Python lists every step would cost O(context) per request per step;
    instead the prompt is copied once and the output copy only grows by the new tokens.
    Entries are tied to the Request object (a new request reusing an id starts afresh) and
    live until `forget` (the sampler's `free`).

    Ids without a logits column are left out: a tokenizer may know tokens beyond the model's
    output vocabulary, the model cannot generate them, so there is nothing to penalise
    (transformers drops them too).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._prompts: dict[str, tuple[Request, torch.Tensor]] = {}
        # request -> (request, device ids, how many of output_token_ids they cover)
        self._outputs: dict[str, tuple[Request, torch.Tensor, int]] = {}

    def forget(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        self._outputs.pop(request_id, None)

    def prompt_ids(self, request: Request, num_columns: int) -> torch.Tensor:
        entry = self._prompts.get(request.request_id)
        if entry is not None and entry[0] is request:
            return entry[1]
        prompt = self._to_device(request.prompt_token_ids, num_columns)
        self._prompts[request.request_id] = (request, prompt)
        return prompt

    def output_ids(self, request: Request, num_columns: int) -> torch.Tensor:
        output_token_ids = request.output_token_ids
        entry = self._outputs.get(request.request_id)
        if entry is None or entry[0] is not request or entry[2] > len(output_token_ids):
            output = self._to_device(output_token_ids, num_columns)
        elif entry[2] < len(output_token_ids):
            new_ids = self._to_device(output_token_ids[entry[2] :], num_columns)
            output = torch.cat([entry[1], new_ids])
        else:
            output = entry[1]
        self._outputs[request.request_id] = (request, output, len(output_token_ids))
        return output

    def _to_device(self, token_ids: list[int], num_columns: int) -> torch.Tensor:
        in_range = [token_id for token_id in token_ids if token_id < num_columns]
        return torch.tensor(in_range, dtype=torch.long, device=self.device)

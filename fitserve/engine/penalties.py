"""Penalties that push the model away from tokens it already produced.

Repetition penalty (CTRL / Hugging Face style, over prompt and output) divides a seen
token's positive logit and multiplies a negative one; presence and frequency penalties
(OpenAI style, over output only) subtract a constant once per seen token and per occurrence.
Both need per-row token counts, which come from one scatter_add over the whole batch.
"""

from __future__ import annotations

import torch

from fitserve.engine.request import Request


def apply_penalties(
    logits: torch.Tensor,
    requests: list[Request],
    token_tensors: TokenTensors | None = None,
) -> torch.Tensor:
    """Logits after repetition (prompt + output, CTRL style), then presence/frequency (output only).

    Returns a new tensor; rows whose request has no penalty come back unchanged. Which
    penalties run is decided from the Python values, so no device sync is needed for it.
    `token_tensors` lets the sampler reuse device copies of the token ids between steps.
    """
    device = logits.device
    num_columns = logits.shape[-1]
    all_params = [request.sampling_params for request in requests]
    token_tensors = token_tensors or TokenTensors(device)
    output_counts = _token_counts(
        [token_tensors.output_ids(request) for request in requests], num_columns, device
    )

    repetition = [params.repetition_penalty for params in all_params]
    if any(value != 1.0 for value in repetition):
        # Only rows with a real repetition penalty pay for counting their prompt.
        prompts = [
            token_tensors.prompt_ids(request) if value != 1.0 else None
            for request, value in zip(requests, repetition)
        ]
        seen = (_token_counts(prompts, num_columns, device) + output_counts) > 0
        repetition_tensor = _column(repetition, device)
        penalised = torch.where(logits > 0, logits / repetition_tensor, logits * repetition_tensor)
        logits = torch.where(seen, penalised, logits)

    frequency = [params.frequency_penalty for params in all_params]
    presence = [params.presence_penalty for params in all_params]
    if any(value != 0.0 for value in frequency + presence):
        logits = (
            logits
            - _column(frequency, device) * output_counts
            - _column(presence, device) * (output_counts > 0).float()
        )
    return logits


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    """Per-row values as a [rows, 1] float32 tensor that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(-1)


def _token_counts(
    token_tensors: list[torch.Tensor | None], num_columns: int, device: torch.device
) -> torch.Tensor:
    """[rows, vocab] float32 occurrence counts (None: a row left at zero), one scatter_add.

    Each row's ids are shifted into one flat index, so ragged rows need neither padding nor a
    per-row kernel. Every row has one extra dump column, cut off at the end, that absorbs ids
    the logits have no column for (tokenizer tokens beyond the model's output vocabulary):
    such tokens cannot be generated, so there is nothing to penalise (as in transformers).
    """
    num_rows = len(token_tensors)
    row_width = num_columns + 1
    counts = torch.zeros(num_rows * row_width, dtype=torch.float32, device=device)
    shifted = [
        ids.clamp(max=num_columns) + row * row_width
        for row, ids in enumerate(token_tensors)
        if ids is not None and ids.numel() > 0
    ]
    if shifted:
        flat_index = torch.cat(shifted)
        counts.scatter_add_(0, flat_index, torch.ones_like(flat_index, dtype=torch.float32))
    return counts.view(num_rows, row_width)[:, :num_columns]


class TokenTensors:
    """Device copies of requests' prompt and output ids for the penalties.

    Rebuilding them from Python lists every step would cost O(context) per request per step;
    instead the prompt is copied once and the output copy only grows by the new tokens.
    Entries are tied to the Request object (a new request reusing an id starts afresh) and
    live until `forget` (the sampler's `free`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._prompts: dict[str, tuple[Request, torch.Tensor]] = {}
        self._outputs: dict[str, tuple[Request, torch.Tensor]] = {}

    def forget(self, request_id: str) -> None:
        self._prompts.pop(request_id, None)
        self._outputs.pop(request_id, None)

    def prompt_ids(self, request: Request) -> torch.Tensor:
        entry = self._prompts.get(request.request_id)
        if entry is not None and entry[0] is request:
            return entry[1]
        prompt = self._to_device(request.prompt_token_ids)
        self._prompts[request.request_id] = (request, prompt)
        return prompt

    def output_ids(self, request: Request) -> torch.Tensor:
        output_token_ids = request.output_token_ids
        entry = self._outputs.get(request.request_id)
        if entry is None or entry[0] is not request or entry[1].numel() > len(output_token_ids):
            output = self._to_device(output_token_ids)
        elif entry[1].numel() < len(output_token_ids):
            new_ids = self._to_device(output_token_ids[entry[1].numel() :])
            output = torch.cat([entry[1], new_ids])
        else:
            output = entry[1]
        self._outputs[request.request_id] = (request, output)
        return output

    def _to_device(self, token_ids: list[int]) -> torch.Tensor:
        return torch.tensor(token_ids, dtype=torch.long, device=self.device)

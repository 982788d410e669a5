"""Temperature, top-k, top-p and min-p keep exactly the tokens transformers' warpers keep."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fitserve.engine.request import Request
from fitserve.engine.sampling_filters import sampling_weights
from fitserve.sampling_params import SamplingParams


def make_request(params: SamplingParams, request_id: str) -> Request:
    return Request(request_id, [0], params)


def kept_by_transformers(logits_row: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Tokens that survive transformers' warpers, in its order: temperature, top-k, top-p, min-p."""
    warpers = [TemperatureLogitsWarper(params.temperature)]
    if params.top_k > 0:
        warpers.append(TopKLogitsWarper(params.top_k))
    if params.top_p < 1.0:
        warpers.append(TopPLogitsWarper(params.top_p))
    if params.min_p > 0:
        warpers.append(MinPLogitsWarper(params.min_p))
    scores = logits_row.unsqueeze(0).clone()
    for warper in warpers:
        scores = warper(None, scores)
    return scores[0] > float("-inf")


FILTER_SETTINGS = [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, top_k=10, top_p=0.6),
    dict(temperature=0.5, min_p=0.05),
    dict(temperature=1.0, top_k=20, top_p=0.9, min_p=0.1),
    dict(temperature=0.9, top_k=700, top_p=0.95),
    dict(temperature=1.0),
]


@pytest.mark.parametrize("vocab_size", [64, 4096])
@pytest.mark.parametrize("logit_scale", [3.0, 0.2])
def test_filters_keep_the_tokens_transformers_keeps(vocab_size: int, logit_scale: float) -> None:
    # A large vocabulary with peaked rows takes the candidate path for top-p, with flat rows
    # the full-sort fallback; every row has its own settings.
    generator = torch.Generator().manual_seed(10)
    logits = torch.randn(len(FILTER_SETTINGS), vocab_size, generator=generator) * logit_scale
    all_params = [SamplingParams(**settings) for settings in FILTER_SETTINGS]
    requests = [make_request(params, f"f{row}") for row, params in enumerate(all_params)]
    ours = sampling_weights(logits, requests) > 0
    for row, params in enumerate(all_params):
        assert torch.equal(ours[row], kept_by_transformers(logits[row], params)), params

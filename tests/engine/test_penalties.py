"""Repetition, presence and frequency penalties: the formulas, and parity with transformers."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from fitserve.engine.penalties import apply_penalties
from fitserve.engine.request import Request
from fitserve.sampling_params import SamplingParams


def make_request(
    params: SamplingParams,
    request_id: str = "r",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
) -> Request:
    request = Request(request_id, list(prompt or [0]), params)
    request.output_token_ids = list(output or [])
    return request


def test_penalties_follow_the_formulas() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0, 1.0]])
    params = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    # Token 0 only in the prompt, token 1 in the prompt and output, token 3 twice in output.
    request = make_request(params, prompt=[0, 1], output=[1, 3, 3])
    penalised = apply_penalties(logits, [request])[0].tolist()
    expected = [
        2.0 / 2.0,  # repetition only: positive logit divided
        -1.0 * 2.0 - 0.25 * 1 - 0.5,  # negative logit multiplied, then one output occurrence
        0.5,  # never seen
        3.0 / 2.0 - 0.25 * 2 - 0.5,  # seen twice in the output
        -2.0,
        1.0,
    ]
    assert penalised == pytest.approx(expected)


def test_presence_and_frequency_ignore_the_prompt() -> None:
    logits = torch.tensor([[1.0, 1.0, 1.0]])
    request = make_request(
        SamplingParams(presence_penalty=1.0, frequency_penalty=1.0), prompt=[0, 0, 1]
    )
    assert apply_penalties(logits, [request])[0].tolist() == [1.0, 1.0, 1.0]


def test_repetition_penalty_matches_transformers() -> None:
    generator = torch.Generator().manual_seed(9)
    logits = torch.randn(3, 40, generator=generator) * 3
    requests = []
    for row, penalty in enumerate([1.3, 0.8, 1.0]):
        prompt = torch.randint(0, 40, (12,), generator=generator).tolist()
        output = torch.randint(0, 40, (5,), generator=generator).tolist()
        requests.append(
            make_request(SamplingParams(repetition_penalty=penalty), f"h{row}", prompt, output)
        )
    ours = apply_penalties(logits, requests)
    for row, request in enumerate(requests):
        processor = RepetitionPenaltyLogitsProcessor(request.sampling_params.repetition_penalty)
        input_ids = torch.tensor([request.all_token_ids])
        theirs = processor(input_ids, logits[row : row + 1].clone())[0]
        assert torch.equal(ours[row], theirs)


def test_token_ids_beyond_the_logits_are_not_penalised() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    request = make_request(
        SamplingParams(repetition_penalty=2.0, frequency_penalty=1.0), prompt=[7], output=[5, 1]
    )
    assert apply_penalties(logits, [request])[0].tolist() == [1.0, 2.0 / 2.0 - 1.0, 3.0]

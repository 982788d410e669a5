"""Sampler behaviour users rely on: greedy parity, filters, seeds, penalties, log-probs."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

from fitserve.engine.request import Request
from fitserve.engine.sampler import Sampler, compute_prompt_logprobs
from fitserve.kernels import cpu as cpu_kernels
from fitserve.sampling_params import SamplingParams

VOCAB = 16


def make_request(
    params: SamplingParams,
    request_id: str = "r",
    prompt: list[int] | None = None,
    output: list[int] | None = None,
    eos_token_ids: tuple[int, ...] = (),
) -> Request:
    request = Request(request_id, list(prompt or [0]), params, eos_token_ids=eos_token_ids)
    request.output_token_ids = list(output or [])
    return request


def sample_many(
    sampler: Sampler, logits_row: torch.Tensor, params: SamplingParams, num_samples: int = 3000
) -> Counter:
    """Draw num_samples tokens from one distribution in a single batched call."""
    requests = [make_request(params, f"r{i}") for i in range(num_samples)]
    batch = logits_row.unsqueeze(0).expand(num_samples, -1).contiguous()
    return Counter(sampler.sample(batch, requests).token_ids)


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(VOCAB, torch.device("cpu"), seed=1234)


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor(probs, dtype=torch.float32).log()


def test_greedy_is_argmax_in_fast_path_and_in_mixed_batches(sampler: Sampler) -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, VOCAB, generator=generator)
    expected = logits.argmax(dim=-1).tolist()

    greedy_requests = [make_request(SamplingParams(), f"g{i}") for i in range(6)]
    assert sampler.sample(logits, greedy_requests).token_ids == expected

    # Greedy rows keep their argmax even when random rows and log-prob rows share the batch.
    mixed = [
        make_request(
            SamplingParams(temperature=1.0) if row % 2 else SamplingParams(logprobs=2), f"m{row}"
        )
        for row in range(6)
    ]
    mixed_tokens = sampler.sample(logits, mixed).token_ids
    assert mixed_tokens[0::2] == expected[0::2]


def test_greedy_ties_pick_the_first_token_like_transformers() -> None:
    # transformers' greedy search takes argmax, i.e. the lowest id among tied maxima; a
    # vocabulary-sized row checks this also where the reduction runs in parallel chunks.
    vocab = 151_936
    sampler = Sampler(vocab, torch.device("cpu"))
    logits = torch.zeros(4, vocab)
    logits[:, [100, 75_000, 150_000]] = 3.0
    logits[2, 7] = 3.0
    logits[3] = float("-inf")
    requests = [make_request(SamplingParams(), f"t{row}") for row in range(4)]
    assert sampler.sample(logits, requests).token_ids == [100, 100, 7, 0]


@pytest.mark.parametrize("path", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("vocab", [100, 151_936, 151_646])
def test_greedy_matches_max_wherever_the_maximum_falls(
    vocab: int, dtype: torch.dtype, path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Greedy search runs the compiled argmax kernel on CPUs that build it, and reduces blocks
    # of columns with torch ops elsewhere; on either path, in float32 or bf16 logits (which the
    # model now returns as they are), the answer must not depend on where the maximum falls:
    # inside a block, in the columns past the last full block (151_646 is not a multiple of
    # the block, nor of the kernel's 8 lanes), tied across both, or a NaN (reported as `max`
    # reports it), for a batch and for each row alone (a single stream).
    if path == "torch":
        monkeypatch.setattr("fitserve.engine.sampler.cpu_kernels.get", lambda: None)
    else:
        assert cpu_kernels.get() is not None, "the compiled kernels must build on this CPU"
    sampler = Sampler(vocab, torch.device("cpu"))
    logits = torch.randn(7, vocab, generator=torch.Generator().manual_seed(vocab))
    logits[1, -1] = 10.0
    logits[2, [3, vocab - 2]] = 10.0
    logits[3, vocab // 2] = float("nan")
    logits[4, -3] = float("nan")
    logits[5, [0, vocab - 1]] = float("nan")
    logits[6] = float("-inf")
    logits = logits.to(dtype)
    expected = logits.max(dim=-1).indices.tolist()
    assert expected[1:3] == [vocab - 1, 3] and expected[3:6] == [vocab // 2, vocab - 3, 0] and expected[6] == 0
    requests = [make_request(SamplingParams(), f"r{row}") for row in range(7)]
    assert sampler.sample(logits, requests).token_ids == expected
    for row in range(7):
        assert sampler.sample(logits[row : row + 1], requests[row : row + 1]).token_ids == [expected[row]]


def test_logits_wider_than_the_vocab_work_in_every_path(sampler: Sampler) -> None:
    # Padded embedding columns (here masked to -inf) must not trip any path up.
    padded = torch.randn(4, VOCAB + 8, generator=torch.Generator().manual_seed(11))
    padded[:, VOCAB:] = float("-inf")
    requests = [
        make_request(SamplingParams(), "greedy"),
        make_request(SamplingParams(repetition_penalty=1.2, logprobs=3), "penalised", [VOCAB + 2]),
        make_request(SamplingParams(temperature=1.0, top_p=0.9, seed=3), "seeded"),
        make_request(SamplingParams(temperature=0.8, top_k=4, min_p=0.1), "random"),
    ]
    result = sampler.sample(padded, requests)
    assert all(0 <= token_id < VOCAB for token_id in result.token_ids)
    assert result.token_ids[0] == int(padded[0].argmax())


def test_top_k_1_equals_greedy(sampler: Sampler) -> None:
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(1))
    requests = [make_request(SamplingParams(temperature=1.5, top_k=1), f"k{i}") for i in range(8)]
    assert sampler.sample(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_tiny_temperature_behaves_like_greedy(sampler: Sampler) -> None:
    logits = torch.randn(8, VOCAB, generator=torch.Generator().manual_seed(2))
    requests = [make_request(SamplingParams(temperature=1e-4), f"t{i}") for i in range(8)]
    assert sampler.sample(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_vanishing_temperature_is_greedy_not_nan(sampler: Sampler) -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(8)) * 30
    requests = [
        make_request(SamplingParams(temperature=1e-9, top_p=0.9), f"v{i}") for i in range(4)
    ]
    assert sampler.sample(logits, requests).token_ids == logits.argmax(dim=-1).tolist()


def test_temperature_one_follows_softmax_frequencies(sampler: Sampler) -> None:
    probs = [0.4, 0.3, 0.2, 0.1]
    counts = sample_many(sampler, logits_from_probs(probs), SamplingParams(temperature=1.0), 4000)
    for token_id, probability in enumerate(probs):
        assert abs(counts[token_id] / 4000 - probability) < 0.04


def test_top_k_keeps_exactly_the_k_most_likely(sampler: Sampler) -> None:
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0, 2.9, 0.5, 0.2])
    counts = sample_many(sampler, logits, SamplingParams(temperature=2.0, top_k=3))
    assert set(counts) == {1, 3, 5}


def test_top_p_keeps_the_smallest_set_reaching_p(sampler: Sampler) -> None:
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    narrow = SamplingParams(temperature=1.0, top_p=0.75)
    wider = SamplingParams(temperature=1.0, top_p=0.85)
    assert set(sample_many(sampler, logits, narrow)) == {0, 1}
    assert set(sample_many(sampler, logits, wider)) == {0, 1, 2}
    # Filters combine: top-k first, then top-p over what is left, renormalised (as in HF):
    # {0, 1} become 0.625 / 0.375, so 0.6 is reached by token 0 alone.
    combined = SamplingParams(temperature=1.0, top_k=2, top_p=0.6)
    assert set(sample_many(sampler, logits, combined)) == {0}


def test_min_p_drops_tokens_below_fraction_of_the_best(sampler: Sampler) -> None:
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05])
    # Threshold = min_p * 0.5: 0.1 keeps 0.15 but not 0.05; 0.25 keeps only 0.5 and 0.3.
    loose = SamplingParams(temperature=1.0, min_p=0.2)
    strict = SamplingParams(temperature=1.0, min_p=0.5)
    assert set(sample_many(sampler, logits, loose)) == {0, 1, 2}
    assert set(sample_many(sampler, logits, strict)) == {0, 1}


def test_per_row_filters_in_one_batch(sampler: Sampler) -> None:
    logits = logits_from_probs([0.5, 0.3, 0.15, 0.05]).unsqueeze(0).expand(3000, -1).contiguous()
    settings = [
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=1.0, top_p=0.75),
        SamplingParams(temperature=1.0),
    ]
    requests = [make_request(settings[row % 3], f"p{row}") for row in range(3000)]
    tokens = sampler.sample(logits, requests).token_ids
    assert set(tokens[0::3]) == {0}
    assert set(tokens[1::3]) == {0, 1}
    assert set(tokens[2::3]) == {0, 1, 2, 3}


def test_top_k_rows_next_to_unlimited_rows(sampler: Sampler) -> None:
    logits = logits_from_probs([0.4, 0.3, 0.2, 0.1]).unsqueeze(0).expand(2000, -1).contiguous()
    settings = [SamplingParams(temperature=1.0, top_k=2), SamplingParams(temperature=1.0, top_k=-1)]
    requests = [make_request(settings[row % 2], f"k{row}") for row in range(2000)]
    tokens = sampler.sample(logits, requests).token_ids
    assert set(tokens[0::2]) == {0, 1}
    assert set(tokens[1::2]) == {0, 1, 2, 3}


def test_seeded_request_repeats_whatever_the_batch(sampler: Sampler) -> None:
    generator = torch.Generator().manual_seed(3)
    seeded = SamplingParams(temperature=1.0, seed=42)
    steps = [torch.randn(VOCAB, generator=generator) for _ in range(5)]

    def run(batch_size: int, row: int, other_params: SamplingParams, fresh: Sampler) -> list[int]:
        tokens = []
        for step_logits in steps:
            others = torch.randn(batch_size, VOCAB, generator=generator)
            others[row] = step_logits
            requests = [make_request(other_params, f"other{i}") for i in range(batch_size)]
            requests[row] = make_request(seeded, "seeded")
            tokens.append(fresh.sample(others, requests).token_ids[row])
        return tokens

    alone = run(1, 0, seeded, Sampler(VOCAB, torch.device("cpu"), seed=0))
    crowded = run(
        7,
        4,
        SamplingParams(temperature=0.8, top_p=0.9),
        Sampler(VOCAB, torch.device("cpu"), seed=99),
    )
    with_greedy = run(3, 2, SamplingParams(), Sampler(VOCAB, torch.device("cpu"), seed=5))
    assert alone == crowded == with_greedy


def test_seeded_top_p_row_ignores_how_its_neighbours_are_filtered() -> None:
    # With a large vocabulary top-p takes a fast path for peaked rows and sorts flat ones;
    # a seeded row's tokens must not depend on which path its neighbours need.
    vocab_size = 2048
    generator = torch.Generator().manual_seed(12)
    peaked = torch.randn(vocab_size, generator=generator) * 4
    flat = torch.randn(3, vocab_size, generator=generator) * 0.1
    seeded = SamplingParams(temperature=0.9, top_p=0.9, seed=5)

    def tokens(neighbours: torch.Tensor) -> list[int]:
        fresh = Sampler(vocab_size, torch.device("cpu"))
        batch = torch.cat([neighbours, peaked.unsqueeze(0)])
        requests = [
            make_request(SamplingParams(temperature=1.0, top_p=0.95), f"n{row}")
            for row in range(len(neighbours))
        ] + [make_request(seeded, "seeded")]
        return [fresh.sample(batch, requests).token_ids[-1] for _ in range(8)]

    assert tokens(flat) == tokens(peaked.unsqueeze(0).expand(3, -1)) == tokens(flat[:0])


def test_free_restarts_a_seeded_stream(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)
    params = SamplingParams(temperature=1.0, seed=7)
    first = [sampler.sample(logits, [make_request(params, "a")]).token_ids[0] for _ in range(6)]
    sampler.free("a")
    again = [sampler.sample(logits, [make_request(params, "a")]).token_ids[0] for _ in range(6)]
    assert first == again
    assert len(set(first)) > 1, "a seeded stream still advances from step to step"


def test_unseeded_rows_vary_across_calls(sampler: Sampler) -> None:
    logits = torch.zeros(1, VOCAB)
    drawn = {
        sampler.sample(logits, [make_request(SamplingParams(temperature=1.0))]).token_ids[0]
        for _ in range(20)
    }
    assert len(drawn) > 3


def test_penalties_track_a_growing_output_across_steps(sampler: Sampler) -> None:
    logits = torch.tensor([[2.0, 1.9, 1.8]])
    request = make_request(SamplingParams(frequency_penalty=0.15), "grow")
    chosen = []
    for _ in range(4):
        token_id = sampler.sample(logits, [request]).token_ids[0]
        chosen.append(token_id)
        request.output_token_ids.append(token_id)
    # Each pick costs its token 0.15: 2.0 | 1.85 < 1.9 | 1.85 > 1.8 vs 1.75 | 1.7 < 1.75 < 1.8.
    assert chosen == [0, 1, 0, 2]
    # A new request under the same id (after free, or even without it) starts from its own ids.
    fresh = make_request(SamplingParams(frequency_penalty=0.15), "grow", output=[2, 2, 2, 1])
    assert sampler.sample(logits, [fresh]).token_ids == [0]


def test_penalties_are_per_row_and_steer_greedy(sampler: Sampler) -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    penalised = make_request(SamplingParams(repetition_penalty=2.0), "p", prompt=[0])
    plain = make_request(SamplingParams(), "q", prompt=[0])
    # 3.0 / 2 = 1.5 < 2.0, so the penalised row's argmax moves to token 1.
    assert sampler.sample(logits, [penalised, plain]).token_ids == [1, 0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached(sampler: Sampler) -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 1.0]])
    params = SamplingParams(min_tokens=2, stop_token_ids=[1])
    early = make_request(params, output=[3], eos_token_ids=(0,))
    assert sampler.sample(logits, [early]).token_ids == [2]
    done = make_request(params, output=[3, 3], eos_token_ids=(0,))
    assert sampler.sample(logits, [done]).token_ids == [0]
    no_eos = make_request(params, output=[3], eos_token_ids=())
    assert sampler.sample(logits, [no_eos]).token_ids == [0]
    # A model may have several EOS ids (Llama 3: <|end_of_text|> and <|eot_id|>); all are held.
    several = make_request(SamplingParams(min_tokens=1), output=[], eos_token_ids=(0, 1))
    assert sampler.sample(logits, [several]).token_ids == [2]
    # Under ignore_eos, EOS does not end the request, so it is not suppressed either.
    ignoring = make_request(
        SamplingParams(min_tokens=2, ignore_eos=True), output=[], eos_token_ids=(0,)
    )
    assert sampler.sample(logits, [ignoring]).token_ids == [0]


def test_min_tokens_masks_random_rows_too(sampler: Sampler) -> None:
    logits = torch.zeros(500, 4)
    params = SamplingParams(temperature=1.0, min_tokens=1, stop_token_ids=[2])
    requests = [make_request(params, f"r{i}", eos_token_ids=(0,)) for i in range(500)]
    assert set(sampler.sample(logits, requests).token_ids) == {1, 3}


def expected_rank(row_logprobs: torch.Tensor, token_id: int) -> int:
    return int((row_logprobs > row_logprobs[token_id]).sum()) + 1


def test_logprobs_are_raw_log_softmax_with_ranks(sampler: Sampler) -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(4))
    requests = [
        make_request(SamplingParams(logprobs=3), "a"),
        make_request(
            SamplingParams(temperature=0.7, repetition_penalty=1.5, logprobs=0), "b", prompt=[1, 2]
        ),
        make_request(SamplingParams(temperature=1.0), "c"),
    ]
    result = sampler.sample(logits, requests)
    reference = torch.log_softmax(logits, dim=-1)

    assert result.logprobs[2] is None
    greedy_row = result.logprobs[0]
    top3 = reference[0].topk(3).indices.tolist()
    assert set(greedy_row) == set(top3)
    for token_id, entry in greedy_row.items():
        assert entry.logprob == pytest.approx(reference[0, token_id].item(), abs=1e-6)
        assert entry.rank == expected_rank(reference[0], token_id)
        assert entry.decoded_token is None
    assert greedy_row[result.token_ids[0]].rank == 1

    # logprobs=0: only the sampled token, valued in the raw distribution (no penalty/temperature).
    sampled_row = result.logprobs[1]
    sampled = result.token_ids[1]
    assert list(sampled_row) == [sampled]
    assert sampled_row[sampled].logprob == pytest.approx(reference[1, sampled].item(), abs=1e-6)
    assert sampled_row[sampled].rank == expected_rank(reference[1], sampled)


def test_sampled_token_outside_top_n_is_included(sampler: Sampler) -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    # min_tokens masks tokens 0..2, so greedy picks token 3, which is outside the top-1.
    request = make_request(
        SamplingParams(logprobs=1, min_tokens=1, stop_token_ids=[1, 2]), eos_token_ids=(0,)
    )
    result = sampler.sample(logits, [request])
    assert result.token_ids == [3]
    assert set(result.logprobs[0]) == {0, 3}
    assert result.logprobs[0][3].rank == 4
    assert result.logprobs[0][0].rank == 1


def test_tied_logprobs_share_a_rank(sampler: Sampler) -> None:
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0]])
    result = sampler.sample(logits, [make_request(SamplingParams(logprobs=3))])
    ranks = {token_id: entry.rank for token_id, entry in result.logprobs[0].items()}
    assert ranks == {1: 1, 2: 1, 0: 3}


def test_prompt_logprobs_match_log_softmax() -> None:
    # More rows than one internal chunk, so chunk boundaries are covered too.
    num_positions = 300
    logits = torch.randn(num_positions, VOCAB, generator=torch.Generator().manual_seed(5))
    targets = torch.randint(
        0, VOCAB, (num_positions,), generator=torch.Generator().manual_seed(6)
    ).tolist()
    positions = compute_prompt_logprobs(logits, targets, num_top=2)
    reference = torch.log_softmax(logits, dim=-1)
    assert len(positions) == num_positions
    for index in (0, 1, 255, 256, 299):
        position = positions[index]
        target = targets[index]
        top2 = set(reference[index].topk(2).indices.tolist())
        assert set(position) == top2 | {target}
        for token_id, entry in position.items():
            assert math.isclose(entry.logprob, reference[index, token_id].item(), abs_tol=1e-6)
            assert entry.rank == expected_rank(reference[index], token_id)


def test_prompt_logprobs_with_zero_top_hold_only_the_target() -> None:
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(7))
    positions = compute_prompt_logprobs(logits, [3, 1, 4, 1], num_top=0)
    assert [list(position) for position in positions] == [[3], [1], [4], [1]]

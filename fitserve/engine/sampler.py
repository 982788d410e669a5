"""Turns one step's logits into one token per running request, plus the log-probs asked for.

Every row of a batch may have different sampling settings, so each setting becomes a
per-row tensor and the math runs once for the whole batch; only the random draw is done per
row, because a seeded request must own its random stream (the same seed gives the same tokens
whatever else shares the batch). Semantics follow vLLM / OpenAI / Hugging Face:

    repetition penalty -> presence/frequency penalties          (penalties.py)
    -> min_tokens masking of EOS and stop token ids
    -> greedy argmax, or temperature -> top-k -> top-p -> min-p  (sampling_filters.py)
       -> random draw

Returned log-probs describe the model's raw distribution (log_softmax of the logits as
given, before penalties and temperature), like vLLM's default, so they stay comparable across
sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitserve.engine.penalties import TokenTensors, apply_penalties
from fitserve.engine.request import Request
from fitserve.engine.sampling_filters import sampling_weights
from fitserve.kernels import cpu as cpu_kernels
from fitserve.outputs import Logprob, PositionLogprobs
from fitserve.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "apply_penalties", "compute_prompt_logprobs"]

# Temperatures below this are treated as greedy (as vLLM does): dividing logits by them would
# overflow float32 and turn the softmax into NaN, while the result is the argmax anyway.
_GREEDY_TEMPERATURE = 1e-5

# Rows of prompt logits turned into log-probs at once: bounds the temporary [rows, vocab]
# float32 copy that log_softmax needs for long prompts.
_PROMPT_LOGPROBS_CHUNK_ROWS = 256


@dataclass
class SamplerOutput:
    """One step's result, row i belonging to the i-th request passed to `Sampler.sample`."""

    token_ids: list[int]
    """One sampled token per row."""
    logprobs: list[PositionLogprobs | None]
    """Per row: the sampled token and the top-N (N = params.logprobs); None if not asked."""


_ARGMAX_BLOCK = 256
"""Columns per block of `_argmax`'s first pass."""


def _argmax(rows: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest value, the first one on ties (as `argmax`), in the rows' own
    dtype (bf16 logits widen exactly, so their argmax is the float32 one).

    On CPUs torch's index-tracking reductions (`max(dim)`, `argmax`) run a scalar loop per row:
    0.13-0.19 ms for one row of 151936 logits, 2.3-4.9 ms for 32 rows, at every decode step.
    Where the compiled kernels run, `argmax_rows` takes two vectorised passes per row instead
    (16 us for one bf16 row on 2-core Zen 4). Elsewhere, for several rows `amax` (vectorized,
    no indices) finds each 256-column block's maximum, the index-tracking reduction runs only
    over those block maxima and then inside the winning block: 4-10x faster, same answer.
    The first block holding the maximum holds its first occurrence; columns past the last
    full block are compared separately, and win only when strictly larger (or NaN, which
    `max` also reports first).
    """
    if rows.device.type == "cpu" and rows.dtype in (torch.float32, torch.bfloat16) and rows.shape[-1] > 0:
        kernels = cpu_kernels.get()
        if kernels is not None:
            return kernels.argmax_rows(rows.contiguous())
    num_rows, width = rows.shape
    blocked_width = width - width % _ARGMAX_BLOCK
    if num_rows == 1 or blocked_width == 0:
        return rows.max(dim=-1).indices
    blocks = rows[:, :blocked_width].view(num_rows, blocked_width // _ARGMAX_BLOCK, _ARGMAX_BLOCK)
    best, block = blocks.amax(dim=-1).max(dim=-1)
    row_index = torch.arange(num_rows, device=rows.device)
    chosen = blocks[row_index, block].max(dim=-1).indices + block * _ARGMAX_BLOCK
    if blocked_width < width:
        tail_best, tail_index = rows[:, blocked_width:].max(dim=-1)
        tail_wins = (tail_best > best) | (tail_best.isnan() & ~best.isnan())
        chosen = torch.where(tail_wins, tail_index + blocked_width, chosen)
    return chosen


def _is_greedy(params: SamplingParams) -> bool:
    return params.temperature < _GREEDY_TEMPERATURE


def _needs_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def _min_tokens_masked_ids(request: Request) -> list[int]:
    """Token ids that must not be sampled yet because the request wants more output first.

    EOS is left alone under ignore_eos: it does not end the request then, so there is no
    reason to keep the model from producing it (vLLM behaves the same way).
    """
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        return []
    masked = list(params.stop_token_ids)
    if not params.ignore_eos:
        masked.extend(request.eos_token_ids)
    return masked


def _ranks_within_top(top_logprobs: torch.Tensor) -> torch.Tensor:
    """Rank (1 + number of strictly higher values) of each entry of rows sorted descending.

    Every value strictly higher than a top-N entry is itself in the top-N, so counting inside
    the small top-N block gives the rank over the whole vocabulary, ties included.
    """
    strictly_higher = top_logprobs.unsqueeze(-1) < top_logprobs.unsqueeze(-2)
    return strictly_higher.sum(dim=-1) + 1


def _position_logprobs(
    chosen_token_id: int,
    chosen_logprob: float,
    chosen_rank: int,
    top_token_ids: list[int],
    top_logprobs: list[float],
    top_ranks: list[int],
) -> PositionLogprobs:
    position: PositionLogprobs = {
        token_id: Logprob(logprob=logprob, rank=rank)
        for token_id, logprob, rank in zip(top_token_ids, top_logprobs, top_ranks)
    }
    # The chosen token's own entry wins over a top-N entry for the same id (they are equal
    # anyway) and is added when it fell outside the top-N.
    position[chosen_token_id] = Logprob(logprob=chosen_logprob, rank=chosen_rank)
    return position


def _gather_logprobs(
    raw_logprobs: torch.Tensor, chosen_token_ids: torch.Tensor, num_top_per_row: list[int]
) -> list[PositionLogprobs]:
    """Log-prob and rank of each row's chosen token, plus each row's own top-N tokens.

    One topk with the batch's largest N serves every row; each row then keeps its own prefix.
    """
    chosen_logprobs = raw_logprobs.gather(-1, chosen_token_ids.unsqueeze(-1))
    chosen_ranks = (raw_logprobs > chosen_logprobs).sum(dim=-1) + 1
    num_rows = raw_logprobs.shape[0]
    largest_top = max(num_top_per_row, default=0)
    if largest_top > 0:
        top_logprobs, top_token_ids = raw_logprobs.topk(largest_top, dim=-1)
        top_ranks = _ranks_within_top(top_logprobs)
        top_ids_rows = top_token_ids.tolist()
        top_lps_rows = top_logprobs.tolist()
        top_ranks_rows = top_ranks.tolist()
    else:
        top_ids_rows = top_lps_rows = top_ranks_rows = [[] for _ in range(num_rows)]
    chosen_ids_list = chosen_token_ids.tolist()
    chosen_lps_list = chosen_logprobs.squeeze(-1).tolist()
    chosen_ranks_list = chosen_ranks.tolist()
    return [
        _position_logprobs(
            chosen_ids_list[row],
            chosen_lps_list[row],
            chosen_ranks_list[row],
            top_ids_rows[row][: num_top_per_row[row]],
            top_lps_rows[row][: num_top_per_row[row]],
            top_ranks_rows[row][: num_top_per_row[row]],
        )
        for row in range(num_rows)
    ]


def compute_prompt_logprobs(
    logits: torch.Tensor, target_token_ids: list[int], num_top: int
) -> list[PositionLogprobs]:
    """Log-probs of prompt tokens: logits[i] predicts target_token_ids[i].

    Each position holds the target's log-prob and rank plus the top `num_top` tokens, all from
    the raw distribution (no penalties or temperature, as in vLLM).
    """
    assert logits.shape[0] == len(target_token_ids), "one logits row per target token"
    positions: list[PositionLogprobs] = []
    targets = torch.tensor(target_token_ids, dtype=torch.long, device=logits.device)
    for start in range(0, len(target_token_ids), _PROMPT_LOGPROBS_CHUNK_ROWS):
        stop = start + _PROMPT_LOGPROBS_CHUNK_ROWS
        chunk_logprobs = torch.log_softmax(logits[start:stop].float(), dim=-1)
        chunk_targets = targets[start:stop]
        num_top_per_row = [num_top] * chunk_targets.shape[0]
        positions.extend(_gather_logprobs(chunk_logprobs, chunk_targets, num_top_per_row))
    return positions


class Sampler:
    """Samples one token per row of a logits batch, honouring each request's SamplingParams."""

    def __init__(self, vocab_size: int, device: torch.device, seed: int = 0) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.seed = seed
        # Unseeded random rows share one stream so that runs of the whole engine repeat.
        self.generator = torch.Generator(device=self.device)
        self.generator.manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}
        self._token_tensors = TokenTensors(self.device)

    def free(self, request_id: str) -> None:
        """Forget a finished request's random stream and cached token ids."""
        self._request_generators.pop(request_id, None)
        self._token_tensors.forget(request_id)

    def _generator_for(self, request: Request) -> torch.Generator:
        generator = self._request_generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.sampling_params.seed)
            self._request_generators[request.request_id] = generator
        return generator

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SamplerOutput:
        """Pick the next token of every request.

        logits: [len(requests), vocab] (float32, or anything that converts); row i is requests[i].
        """
        assert logits.shape[0] == len(requests), "one logits row per request"
        all_params = [request.sampling_params for request in requests]
        rows_wanting_logprobs = [
            row for row, params in enumerate(all_params) if params.logprobs is not None
        ]
        any_penalty = any(_needs_penalties(params) for params in all_params)
        min_tokens_masks = [_min_tokens_masked_ids(request) for request in requests]
        all_greedy = all(_is_greedy(params) for params in all_params)

        if (
            all_greedy
            and not any_penalty
            and not any(min_tokens_masks)
            and not rows_wanting_logprobs
        ):
            return SamplerOutput(_argmax(logits).tolist(), [None] * len(requests))

        logits = logits.float()
        raw_logits = logits
        if any_penalty:
            logits = apply_penalties(logits, requests, self._token_tensors)
        if any(min_tokens_masks):
            logits = self._mask_tokens(logits, min_tokens_masks)

        random_rows = [row for row, params in enumerate(all_params) if not _is_greedy(params)]
        if len(random_rows) == len(requests):
            chosen = self._draw(sampling_weights(logits, requests), requests)
        else:
            chosen = _argmax(logits)
            if random_rows:
                random_index = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
                random_requests = [requests[row] for row in random_rows]
                weights = sampling_weights(logits[random_index], random_requests)
                chosen[random_index] = self._draw(weights, random_requests)

        logprobs: list[PositionLogprobs | None] = [None] * len(requests)
        if rows_wanting_logprobs:
            index = torch.tensor(rows_wanting_logprobs, dtype=torch.long, device=logits.device)
            num_top_per_row = [all_params[row].logprobs for row in rows_wanting_logprobs]
            raw_logprobs = torch.log_softmax(raw_logits[index], dim=-1)
            gathered = _gather_logprobs(raw_logprobs, chosen[index], num_top_per_row)
            for row, position in zip(rows_wanting_logprobs, gathered):
                logprobs[row] = position
        return SamplerOutput(chosen.tolist(), logprobs)

    @staticmethod
    def _mask_tokens(logits: torch.Tensor, masked_ids_per_row: list[list[int]]) -> torch.Tensor:
        row_index = [row for row, ids in enumerate(masked_ids_per_row) for _ in ids]
        column_index = [token_id for ids in masked_ids_per_row for token_id in ids]
        logits = logits.clone()
        logits[row_index, column_index] = float("-inf")
        return logits

    def _draw(self, weights: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """One token per row by an exponential race: argmax(weights / Exponential(1) noise).

        This is an exact sample from the distribution proportional to `weights` (so nothing
        needs normalising), and the noise of a seeded row comes only from its own generator,
        so the row's token does not depend on its batch neighbours or its position. The noise
        is -log(uniform), several times cheaper on CPUs than `exponential_`.
        """
        num_rows, num_columns = weights.shape
        uniform = torch.empty_like(weights)
        unseeded_rows = [row for row, r in enumerate(requests) if r.sampling_params.seed is None]
        if len(unseeded_rows) == num_rows:
            uniform.uniform_(generator=self.generator)
        elif unseeded_rows:
            shared = torch.empty(
                (len(unseeded_rows), num_columns), dtype=weights.dtype, device=weights.device
            )
            uniform[unseeded_rows] = shared.uniform_(generator=self.generator)
        for row, request in enumerate(requests):
            if request.sampling_params.seed is not None:
                uniform[row].uniform_(generator=self._generator_for(request))
        # A zero noise (a uniform draw of exactly 1, which some backends allow) would turn a
        # filtered token's 0 weight into 0/0 = NaN, and argmax picks NaN.
        noise = uniform.log_().neg_().clamp_(min=torch.finfo(weights.dtype).tiny)
        return _argmax(weights / noise)

"""Turns one step's logits into one token per running request, plus the log-probs asked for.

Every row of a batch may have different sampling settings, so each setting becomes a
per-row tensor and the math runs once for the whole batch; only the random draw is done per
row, because a seeded request must own its random stream (the same seed gives the same tokens
whatever else shares the batch). Semantics follow vLLM / OpenAI / Hugging Face:

    repetition penalty -> presence/frequency penalties -> min_tokens masking
    -> greedy argmax, or temperature -> top-k -> top-p -> min-p -> random draw

Returned log-probs describe the model's raw distribution (log_softmax of the logits as
given, before penalties and temperature), like vLLM's default, so they stay comparable across
sampling settings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitserve.engine.penalties import TokenTensors, apply_penalties
from fitserve.engine.request import Request
from fitserve.outputs import Logprob, PositionLogprobs
from fitserve.sampling_params import SamplingParams

__all__ = ["Sampler", "SamplerOutput", "apply_penalties", "compute_prompt_logprobs"]

# Temperatures below this are treated as greedy (as vLLM does): dividing logits by them would
# overflow float32 and turn the softmax into NaN, while the result is the argmax anyway.
_GREEDY_TEMPERATURE = 1e-5

# Top-p first looks for each row's nucleus among this many best tokens (a topk is far cheaper
# than sorting a 128k vocabulary on a CPU) and sorts the whole row only when it is not there.
_TOP_P_CANDIDATES = 512

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
            return SamplerOutput(logits.argmax(dim=-1).tolist(), [None] * len(requests))

        logits = logits.float()
        raw_logits = logits
        if any_penalty:
            logits = apply_penalties(logits, requests, self._token_tensors)
        if any(min_tokens_masks):
            logits = self._mask_tokens(logits, min_tokens_masks)

        random_rows = [row for row, params in enumerate(all_params) if not _is_greedy(params)]
        if len(random_rows) == len(requests):
            chosen = self._draw(_sampling_weights(logits, requests), requests)
        else:
            chosen = logits.argmax(dim=-1)
            if random_rows:
                random_index = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
                random_requests = [requests[row] for row in random_rows]
                weights = _sampling_weights(logits[random_index], random_requests)
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
        return (weights / noise).argmax(dim=-1)


def _sampling_weights(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Per-row weights proportional to the probabilities left after temperature, top-k, top-p
    and min-p (random rows only); filtered tokens get weight 0.

    The weights are exp(logit - row max), i.e. probability divided by the top probability:
    no normalising pass is needed, and min-p becomes a plain threshold on them.
    """
    device = logits.device
    num_columns = logits.shape[-1]
    params = [request.sampling_params for request in requests]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    logits = logits / temperature.unsqueeze(-1)

    top_k = [p.top_k if 0 < p.top_k < num_columns else num_columns for p in params]
    top_p = [p.top_p for p in params]
    if any(p < 1.0 for p in top_p):
        logits = filter_top_k_top_p(logits, top_k, top_p)
    elif any(k < num_columns for k in top_k):
        logits = _filter_top_k(logits, top_k)

    weights = (logits - logits.max(dim=-1, keepdim=True).values).exp_()
    min_p = [p.min_p for p in params]
    if any(value > 0.0 for value in min_p):
        min_p_tensor = torch.tensor(min_p, dtype=torch.float32, device=device).unsqueeze(-1)
        weights.masked_fill_(weights < min_p_tensor, 0.0)
    return weights


def _filter_top_k(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Top-k alone needs no full sort: one topk with the batch's largest k gives every row's
    k-th value. Ties with the k-th value are kept (vLLM and HF do the same)."""
    num_columns = logits.shape[-1]
    limited_rows = [k < num_columns for k in top_k]
    largest_k = max(k for k, limited in zip(top_k, limited_rows) if limited)
    top_values = logits.topk(largest_k, dim=-1).values
    # Unlimited rows read any column and are exempted by the row mask below.
    kth_column = _column(
        [k - 1 if limited else 0 for k, limited in zip(top_k, limited_rows)], logits
    )
    kth_value = top_values.gather(-1, kth_column)
    row_is_limited = _column(limited_rows, logits)
    return logits.masked_fill((logits < kth_value) & row_is_limited, float("-inf"))


def filter_top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Top-k, then top-p over what top-k left (renormalised, as in HF); dropped logits -> -inf.

    top_k[row] == vocab means no top-k, top_p[row] == 1 no top-p. Sorting a 128k vocabulary
    is slow on CPUs, so the nucleus is first looked for among the best few hundred tokens; a
    full sort runs only when some row's nucleus does not fit there (a very flat distribution).
    """
    num_columns = logits.shape[-1]
    largest_k = max((k for k in top_k if k < num_columns), default=0)
    num_candidates = max(_TOP_P_CANDIDATES, largest_k)
    if num_candidates < num_columns:
        filtered = _top_k_top_p_among_candidates(logits, top_k, top_p, num_candidates)
        if filtered is not None:
            return filtered
    return _top_k_top_p_by_sort(logits, top_k, top_p)


def _top_p_drop(sorted_probs: torch.Tensor, p_column: torch.Tensor) -> torch.Tensor:
    """Which of the descending-sorted tokens top-p removes.

    A token goes once the more likely ones already reach top_p, so the first always stays.
    Rows with top_p == 1 are exempt so that rounding in the cumsum cannot trim their tail.
    """
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    return (mass_before >= p_column) & (p_column < 1.0)


def _top_k_top_p_by_sort(
    logits: torch.Tensor, top_k: list[int], top_p: list[float]
) -> torch.Tensor:
    sorted_logits, sorted_index = logits.sort(dim=-1, descending=True)
    # Like the top-k-only path, ties with the k-th value survive.
    kth_value = sorted_logits.gather(-1, _column([k - 1 for k in top_k], logits))
    drop_sorted = sorted_logits < kth_value
    sorted_probs = torch.softmax(sorted_logits.masked_fill(drop_sorted, float("-inf")), dim=-1)
    drop_sorted |= _top_p_drop(sorted_probs, _column(top_p, logits, torch.float32))
    drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_index, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def _top_k_top_p_among_candidates(
    logits: torch.Tensor, top_k: list[int], top_p: list[float], num_candidates: int
) -> torch.Tensor | None:
    """Top-k/top-p computed on the `num_candidates` best tokens of each row; None when some
    row's nucleus reaches past them (the caller then sorts everything)."""
    num_columns = logits.shape[-1]
    limited_rows = [k < num_columns for k in top_k]
    row_is_limited = _column(limited_rows, logits)
    p_column = _column(top_p, logits, torch.float32)
    candidate_logits, candidate_index = logits.topk(num_candidates, dim=-1)

    kth_column = _column(
        [k - 1 if limited else 0 for k, limited in zip(top_k, limited_rows)], logits
    )
    within_k = (candidate_logits >= candidate_logits.gather(-1, kth_column)) | ~row_is_limited
    kept_logits = candidate_logits.masked_fill(~within_k, float("-inf"))
    # Top-p renormalises over what top-k kept: all inside the candidates for limited rows,
    # the whole row otherwise.
    normaliser = torch.logsumexp(kept_logits, dim=-1, keepdim=True)
    if not all(limited_rows):
        whole_row = torch.logsumexp(logits, dim=-1, keepdim=True)
        normaliser = torch.where(row_is_limited, normaliser, whole_row)
    sorted_probs = (kept_logits - normaliser).exp()

    # An unlimited row whose candidates hold less than top_p of the mass needs more tokens.
    covered = row_is_limited | (p_column >= 1.0) | (sorted_probs.sum(-1, keepdim=True) >= p_column)
    if not bool(covered.all()):
        return None
    keep_sorted = within_k & ~_top_p_drop(sorted_probs, p_column)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, candidate_index, keep_sorted)
    # Rows with neither filter keep everything, including tokens outside the candidates.
    row_is_filtered = row_is_limited | (p_column < 1.0)
    return logits.masked_fill(~keep & row_is_filtered, float("-inf"))


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row values as a [rows, 1] tensor on `like`'s device, broadcasting over the vocab."""
    return torch.tensor(values, dtype=dtype, device=like.device).unsqueeze(-1)

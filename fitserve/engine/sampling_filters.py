"""Temperature, top-k, top-p and min-p: which tokens a random row may draw, and how likely.

The result is a weight per token, proportional to its probability after the filters and 0
for filtered tokens, which is all the sampler's exponential race needs. Semantics and order
follow transformers' warpers (temperature -> top-k -> top-p -> min-p, top-p renormalised over
what top-k kept, ties with the k-th logit kept).
"""

from __future__ import annotations

import torch

from fitserve.engine.request import Request

# Top-p first looks for each row's nucleus among this many best tokens (a topk is far cheaper
# than sorting a 128k vocabulary on a CPU) and sorts the whole row only when it is not there.
_TOP_P_CANDIDATES = 512


def sampling_weights(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
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
    is slow on CPUs, so each row's nucleus is first looked for among its best few hundred
    tokens; only rows where it does not fit (a very flat distribution, or a top-k larger than
    the candidates) are sorted in full. Which path a row takes depends on that row alone, so a
    seeded request samples the same whatever shares its batch.
    """
    num_columns = logits.shape[-1]
    if _TOP_P_CANDIDATES >= num_columns:
        return _top_k_top_p_by_sort(logits, top_k, top_p)
    filtered, covered = _top_k_top_p_among_candidates(logits, top_k, top_p, _TOP_P_CANDIDATES)
    rows_to_sort = (~covered).nonzero().flatten().tolist()
    if rows_to_sort:
        index = torch.tensor(rows_to_sort, dtype=torch.long, device=logits.device)
        filtered[index] = _top_k_top_p_by_sort(
            logits[index],
            [top_k[row] for row in rows_to_sort],
            [top_p[row] for row in rows_to_sort],
        )
    return filtered


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k/top-p computed on the `num_candidates` best tokens of each row.

    Returns the filtered logits and, per row, whether they are right: False where the nucleus
    reaches past the candidates or top-k keeps more tokens than they hold.
    """
    num_columns = logits.shape[-1]
    limited_rows = [k < num_columns for k in top_k]
    row_is_limited = _column(limited_rows, logits)
    p_column = _column(top_p, logits, torch.float32)
    candidate_logits, candidate_index = logits.topk(num_candidates, dim=-1)

    kth_column = _column([min(k, num_candidates) - 1 for k in top_k], logits)
    within_k = (candidate_logits >= candidate_logits.gather(-1, kth_column)) | ~row_is_limited
    kept_logits = candidate_logits.masked_fill(~within_k, float("-inf"))
    # Top-p renormalises over what top-k kept: inside the candidates for limited rows, the
    # whole row otherwise.
    normaliser = torch.logsumexp(kept_logits, dim=-1, keepdim=True)
    if not all(limited_rows):
        whole_row = torch.logsumexp(logits, dim=-1, keepdim=True)
        normaliser = torch.where(row_is_limited, normaliser, whole_row)
    sorted_probs = (kept_logits - normaliser).exp()
    keep_sorted = within_k & ~_top_p_drop(sorted_probs, p_column)
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, candidate_index, keep_sorted)
    # Rows with neither filter keep everything, including tokens outside the candidates.
    row_is_filtered = row_is_limited | (p_column < 1.0)
    filtered = logits.masked_fill(~keep & row_is_filtered, float("-inf"))

    k_fits = _column([k <= num_candidates or k >= num_columns for k in top_k], logits)
    nucleus_fits = (
        row_is_limited | (p_column >= 1.0) | (sorted_probs.sum(-1, keepdim=True) >= p_column)
    )
    return filtered, (k_fits & nucleus_fits).squeeze(-1)


def _column(values: list, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-row values as a [rows, 1] tensor on `like`'s device, broadcasting over the vocab."""
    return torch.tensor(values, dtype=dtype, device=like.device).unsqueeze(-1)

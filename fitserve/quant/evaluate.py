"""Held-out perplexity of a loaded fitserve model, by the bundled model card's protocol.

The protocol (scripts/evaluate_bundled_model.py, the model card): tokenize the text without
special tokens, cut the ids into consecutive 512-token windows, score every token of a
window except its first from the tokens before it in the same window, and report
exp(mean negative log-likelihood). Here each window is one prefill of fitserve's own model
through a scratch paged cache, so the number measures fitserve's kernels and weight formats,
not a reimplementation.
"""

from __future__ import annotations

import math

import torch

from fitserve.attention.cache_layout import LayerKVCache
from fitserve.attention.metadata import AttentionMetadata
from fitserve.models.llama import LlamaForCausalLM

PERPLEXITY_WINDOW = 512
_BLOCK_SIZE = 16


def heldout_windows(token_ids: list[int], window: int = PERPLEXITY_WINDOW) -> list[list[int]]:
    """Consecutive non-overlapping windows of `window` ids (the last may be shorter; windows
    of fewer than 2 ids score nothing and are dropped)."""
    windows = [token_ids[start:start + window] for start in range(0, len(token_ids), window)]
    return [w for w in windows if len(w) >= 2]


@torch.inference_mode()
def window_nll(model: LlamaForCausalLM, window: list[int]) -> float:
    """Summed negative log-likelihood of window[1:] given the tokens before each."""
    config = model.config
    device = model.model.norm.weight.device
    dtype = model.model.norm.weight.dtype
    length = len(window)
    num_blocks = -(-length // _BLOCK_SIZE)
    shape = (num_blocks, _BLOCK_SIZE, config.num_key_value_heads, config.head_dim)
    caches = [LayerKVCache(torch.zeros(shape, dtype=dtype, device=device),
                           torch.zeros(shape, dtype=dtype, device=device)) for _ in range(config.num_hidden_layers)]
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor([0, length], dtype=torch.int32, device=device),
        seq_lens=torch.tensor([length], dtype=torch.int32, device=device),
        block_tables=torch.arange(num_blocks, dtype=torch.int32, device=device)[None],
        slot_mapping=torch.arange(length, dtype=torch.int64, device=device),
        query_lens_cpu=[length], seq_lens_cpu=[length], block_size=_BLOCK_SIZE,
    )
    ids = torch.tensor(window, device=device)
    hidden = model(ids, torch.arange(length, device=device), caches, metadata)
    logits = model.compute_logits(hidden[:-1]).float()
    return torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()


def perplexity(model: LlamaForCausalLM, windows: list[list[int]]) -> float:
    """exp(mean NLL) over every scored token of `windows`."""
    total = sum(window_nll(model, window) for window in windows)
    return math.exp(total / sum(len(window) - 1 for window in windows))

"""Naming tokens in logprobs responses."""

from __future__ import annotations

from typing import Any

from fitserve.outputs import Logprob


def token_text(tokenizer: Any, token_id: int, logprob: Logprob | None) -> str:
    """The text of one token as logprobs report it (the engine's decoding when it gave one)."""
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return decode(tokenizer, [token_id])


def decode(tokenizer: Any, token_ids: list[int]) -> str:
    """Text of token ids; empty for checkpoints served without a tokenizer (token-id prompts only)."""
    return tokenizer.decode(token_ids) if tokenizer is not None else ""

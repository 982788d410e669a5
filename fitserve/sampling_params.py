"""How to pick the next token, and when to stop. Field names follow vLLM's `SamplingParams`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; the message names the field and the allowed range."""


@dataclass
class SamplingParams:
    """Per-request sampling and stopping settings.

    Greedy decoding is `temperature=0` (the default, so that an unconfigured call is
    reproducible). Every field is validated in `__post_init__`, so an instance that exists is
    an instance the engine can run.
    """

    n: int = 1
    """Number of independent completions for the prompt."""
    temperature: float = 0.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Keep the smallest set of tokens whose probabilities sum to at least top_p."""
    top_k: int = -1
    """Keep the k most likely tokens; -1 (or 0) keeps all."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the most likely token's."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same output whatever else is in the batch."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token that already appeared in the output."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time it appeared in the output."""
    repetition_penalty: float = 1.0
    """CTRL-style: logits of tokens seen in prompt or output are divided (positive) or
    multiplied (negative) by it."""
    stop: list[str] | str | None = None
    """Strings that end generation; the matched string is not included in the text."""
    stop_token_ids: list[int] | None = None
    """Token ids that end generation (in addition to EOS unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length."""
    min_tokens: int = 0
    """EOS and stop token ids are suppressed until this many tokens were generated."""
    logprobs: int | None = None
    """Return the log-prob of each sampled token and the top-N alternatives (0: sampled only)."""
    prompt_logprobs: int | None = None
    """Return the log-prob of each prompt token (after the first) and its top-N alternatives."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    include_stop_str_in_output: bool = False
    """Keep a matched stop string at the end of the text."""
    extra: dict = field(default_factory=dict)
    """Free-form values passed through untouched (e.g. the OpenAI `user` field)."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == 0:
            self.top_k = -1
        self._check()

    def _check(self) -> None:
        def fail(name: str, why: str) -> None:
            raise SamplingParamsError(f"{name} {why} (got {getattr(self, name)!r})")

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                fail(name, "must be a finite number")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            fail("seed", "must be an integer that fits in 64 bits")
        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if self.temperature < 0:
            fail("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            # vLLM's range too; OpenAI's [0, 1] allows 0, which means the most likely token
            # only: that is temperature 0, which the message points to.
            fail("top_p", "must be in (0, 1], as in vLLM (for only the most likely token use temperature 0)")
        if self.top_k < -1:
            fail("top_k", "must be -1 (all tokens) or a positive integer")
        if not 0 <= self.min_p <= 1:
            fail("min_p", "must be in [0, 1]")
        if not -2 <= self.presence_penalty <= 2:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            fail("frequency_penalty", "must be in [-2, 2]")
        if self.repetition_penalty <= 0:
            fail("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and self.max_tokens < 1:
            fail("max_tokens", "must be >= 1")
        if self.min_tokens < 0:
            fail("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 20:
                fail(name, "must be between 0 and 20")
        if any(not s for s in self.stop):
            fail("stop", "must not contain empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

"""The synchronous engine: requests in, one scheduled model step at a time, outputs out."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from fitserve.config import EngineArgs
from fitserve.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams


class PromptTooLongError(ValueError):
    """The prompt (plus the requested output) does not fit the context; the message says the limits."""


@dataclass
class EngineStats:
    """A snapshot for /metrics and benchmarks."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    num_prefix_cache_hit_tokens_total: int
    num_prompt_tokens_total: int
    num_generated_tokens_total: int

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use by running requests (0..1)."""
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


class LLMEngine:
    """Owns the model runner, the KV cache manager and the scheduler (implementation pending)."""

    def __init__(self, args: EngineArgs) -> None:
        raise NotImplementedError

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        sampling_params: SamplingParams,
        arrival_time: float | None = None,
        client_id: str | None = None,
    ) -> None:
        raise NotImplementedError

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        raise NotImplementedError

    def step(self) -> list[RequestOutput]:
        raise NotImplementedError

    def has_unfinished_requests(self) -> bool:
        raise NotImplementedError

    def get_stats(self) -> EngineStats:
        raise NotImplementedError

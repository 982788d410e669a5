"""One request's state inside the engine.

A request's progress is one number, `num_computed_tokens`: how many of its tokens (prompt,
then generated) already have K/V in the cache. Prefill, chunked prefill, prefix-cache hits
and recomputation after preemption all just move that number.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from fitserve.outputs import PositionLogprobs, RequestMetrics
from fitserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    """Waiting to be recomputed from scratch (its KV was dropped)."""
    SWAPPED = "swapped"
    """Waiting with its KV in host memory; progress kept."""
    SWAPPING_IN = "swapping_in"
    """Admitted again: its KV is being copied back; it runs once the copy is done."""
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
        )


@dataclass(eq=False)
class Request:
    """A prompt being served: its tokens, sampling settings, KV blocks and timings."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    prompt: str | None = None
    eos_token_ids: tuple[int, ...] = ()
    """Tokens that end the sequence (a model may have several, e.g. Llama 3's <|eot_id|>)."""
    max_model_len: int = 1 << 30
    client_id: str | None = None
    """Who sent it (the API key's tenant, else the OpenAI `user` field); the `vtc` policy
    shares service fairly between clients."""
    priority: int = 0
    """For the `priority` policy: lower runs first (vLLM's convention); ties by arrival."""
    arrival_time: float = field(default_factory=time.time)
    final_output_only: bool = False
    """Report this request from `LLMEngine.step` only once it finishes (offline generation):
    an output copies every token so far, which for hundreds of running requests, every step,
    costs more host time than the step's bookkeeping itself."""

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    max_num_computed_tokens: int = 0
    """The furthest `num_computed_tokens` has been: positions below it that are computed again
    (after a recompute preemption whose blocks the prefix cache lost) are recomputation."""
    block_ids: list[int] = field(default_factory=list)
    """KV-cache blocks, in order: block i holds tokens [i*block_size, (i+1)*block_size)."""
    kv_weights_epoch: int = 0
    """The KV cache's weights epoch when this request's KV began (its prefix-cache namespace)."""
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    prompt_logprobs: list[PositionLogprobs | None] = field(default_factory=list)
    stop_reason: int | str | None = None
    output_text: str = ""
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_time=self.arrival_time)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    def token_id(self, index: int) -> int:
        """Token at position `index` of prompt + output, without building the joined list."""
        num_prompt = len(self.prompt_token_ids)
        if index < num_prompt:
            return self.prompt_token_ids[index]
        return self.output_token_ids[index - num_prompt]

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def max_output_tokens(self) -> int:
        """Output length limit from max_tokens and the context length, whichever is smaller."""
        room = self.max_model_len - self.num_prompt_tokens
        if self.sampling_params.max_tokens is None:
            return room
        return min(self.sampling_params.max_tokens, room)

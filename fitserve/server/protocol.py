"""OpenAI request bodies as pydantic models, validated at the HTTP edge.

Types are coerced as vLLM's request models coerce them (pydantic's lax mode): `5.0` or `"5"`
is the integer 5, `5.5` is refused. Clients generated from OpenAI's spec send integral floats
(JSON has one number type), and a server that refuses what vLLM accepts breaks clients tested
against vLLM. Unknown fields are refused (`extra="forbid"`, stricter than vLLM, which ignores
them with a warning): a misspelt `temprature` gets a 400 that names it, instead of a silently
different request. Range checks that `SamplingParams` already knows are left to it (one
place per rule); only OpenAI-specific shapes are checked here.

Responses are built as plain dicts in `serving_*.py`: they are only ever serialized, and
dicts keep `null` fields exactly where OpenAI's clients expect them.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

NonNegativeInt = Annotated[int, Field(ge=0)]
MAX_CHOICES = 128
"""OpenAI's own limit on `n`; each choice is a separate engine request."""
# torch generators take 64-bit seeds; choice i uses seed + i, so leave room at the top.
SeedInt = Annotated[int, Field(ge=-(2**63), le=2**63 - 1 - MAX_CHOICES)]


class OpenAIModel(BaseModel):
    # allow_inf_nan=False: a NaN temperature would pass every range check and poison the
    # whole batch's sampling step, not just this request.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI treats an explicit null like an absent field; several client libraries send
        # `"logprobs": null` or `"n": null` for everything the user did not set.
        if isinstance(data, dict):
            return {key: value for key, value in data.items() if value is not None}
        return data


class StreamOptions(OpenAIModel):
    include_usage: bool = False
    """Send a last chunk with the whole request's usage (OpenAI)."""
    continuous_usage_stats: bool = False
    """vLLM extension, sent by GuideLLM: with include_usage, every chunk also carries its
    choice's usage so far (prompt tokens and the tokens generated until that chunk)."""

    @property
    def usage_in_every_chunk(self) -> bool:
        # vLLM ignores continuous_usage_stats unless include_usage is set too.
        return self.include_usage and self.continuous_usage_stats


class ResponseFormat(OpenAIModel):
    """OpenAI's `response_format`; only plain text is served (no structured output)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    type: str

    @model_validator(mode="after")
    def _only_text(self) -> "ResponseFormat":
        if self.type != "text":
            raise ValueError(f"response_format type {self.type!r} is not supported: this server has no "
                             "structured output (JSON mode, JSON schema); leave it out or use \"text\"")
        return self


class SamplingFields(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions.

    Defaults are OpenAI's (temperature 1), not `SamplingParams`' greedy default, because
    clients written against OpenAI expect them.
    """

    model: str | None = None
    """Omitted means the served model (OpenAI requires it; being lenient costs nothing)."""
    temperature: float = 1.0
    top_p: float = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: SeedInt | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions in vLLM's spelling, so the same clients work against both servers.
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: NonNegativeInt = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    response_format: ResponseFormat | None = None
    priority: int = 0
    """Under --scheduling-policy priority: lower runs first, ties by arrival (vLLM's extension)."""

    @model_validator(mode="after")
    def _check_openai_shapes(self) -> "SamplingFields":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        return self


class CompletionRequest(SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: NonNegativeInt | None = 16
    """0 is allowed only with echo (score a prompt without generating, as lm-eval does)."""
    echo: bool = False
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_completion_shapes(self) -> "CompletionRequest":
        if isinstance(self.prompt, list) and not self.prompt:
            raise ValueError("prompt must not be an empty list")
        if isinstance(self.prompt, list) and any(isinstance(item, list) and not item for item in self.prompt):
            raise ValueError("a token-id prompt must not be empty")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be >= 1 (0 is only allowed together with echo)")
        if self.suffix:
            raise ValueError("suffix is not supported by this server; leave it out")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of must equal n when given (got best_of={self.best_of}, n={self.n})")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each text or token ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(item, int) for item in self.prompt):
            return [list(self.prompt)]  # one token-id prompt
        return list(self.prompt)


class TextContentPart(OpenAIModel):
    type: Literal["text"]
    text: str


class ChatMessage(OpenAIModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    """OpenAI's newer name for max_tokens; wins when both are given."""
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    add_generation_prompt: bool = True
    """vLLM extension: end the prompt with the assistant turn's opening."""
    continue_final_message: bool = False
    """vLLM extension: the reply continues the last (assistant) message instead of starting a turn."""
    chat_template_kwargs: dict[str, Any] | None = None
    """vLLM extension: extra variables for the chat template, e.g. {"enable_thinking": false} for Qwen3."""
    tools: list[dict[str, Any]] | None = None
    """Accepted only empty: this server does no tool calling."""
    tool_choice: str | dict[str, Any] | None = None
    """Accepted only as "none" (what clients send when a turn must not call tools)."""

    @model_validator(mode="after")
    def _check_chat_shapes(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt cannot both be true "
                             "(set add_generation_prompt to false to continue the last message)")
        if self.tools:
            raise ValueError("tools are not supported: this server does no tool calling; leave them out")
        if self.tool_choice not in (None, "none"):
            raise ValueError("tool_choice must be \"none\" or left out: this server does no tool calling")
        return self

    @property
    def output_token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

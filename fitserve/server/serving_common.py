"""What /v1/completions and /v1/chat/completions share: the app state, turning a body into
engine requests, server-sent events, and cancelling work whose client went away."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from fitserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, StreamGroup
from fitserve.engine.engine import PromptTooLongError
from fitserve.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams, SamplingParamsError
from fitserve.server.api_keys import APIKeys
from fitserve.server.errors import APIError
from fitserve.server.metrics import SequenceTimer, ServerMetrics
from fitserve.server.protocol import SamplingFields

T = TypeVar("T")


@dataclass
class ServerSettings:
    """HTTP-side settings (the engine has its own `EngineArgs`)."""

    served_model_names: list[str]
    """Names clients may put in `model`; the first is the one responses report."""
    api_key: str | None = None
    """When set, /v1/* requires `Authorization: Bearer <api_key>`."""
    api_keys: APIKeys | None = None
    """From --api-keys-file: further accepted keys, each naming the tenant it belongs to."""
    max_request_body_bytes: int = 1 << 20
    """Larger bodies get 413 before they are parsed."""
    model_path: str = ""
    """Where the weights came from, for /v1/models."""
    max_choices_per_request: int = 1024
    """Most engine requests (prompts x n) one HTTP request may create; more get a 400."""

    @property
    def model_name(self) -> str:
        return self.served_model_names[0]


@dataclass
class ServerState:
    """Everything a route needs, hung on `app.state.fitserve` (no module globals)."""

    async_engine: AsyncLLMEngine
    settings: ServerSettings
    metrics: ServerMetrics
    created_time: int = field(default_factory=lambda: int(time.time()))


def client_id_of(raw_request: Request, body: SamplingFields) -> str | None:
    """Who the scheduler shares service between: the tenant of the API key that made the
    request (set by the key check), else the OpenAI `user` field."""
    return getattr(raw_request.state, "tenant", None) or body.user


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model_name(state: ServerState, requested: str | None) -> None:
    if requested is not None and requested not in state.settings.served_model_names:
        served = ", ".join(state.settings.served_model_names)
        raise APIError(404, f"the model '{requested}' does not exist; this server serves: {served}",
                       param="model", code="model_not_found")


def make_sampling_params(
    body: SamplingFields, *, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None,
    seed: int | None, vocab_size: int,
) -> SamplingParams:
    """The engine's `SamplingParams` for one choice; range errors become a 400 naming the field."""
    if body.stop_token_ids:
        check_token_ids(body.stop_token_ids, vocab_size, "stop_token_ids")
    try:
        return SamplingParams(
            n=1,  # the HTTP layer fans `n` out into separate engine requests
            temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p, seed=seed,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, max_tokens=max_tokens, min_tokens=body.min_tokens, logprobs=logprobs,
            prompt_logprobs=prompt_logprobs, skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output,
            extra={"user": body.user} if body.user else {},
        )
    except SamplingParamsError as error:
        raise APIError(400, str(error), param=str(error).split(" ", 1)[0]) from error


ChoiceT = TypeVar("ChoiceT", bound="Choice")


def check_token_ids(token_ids: list[int], vocab_size: int, param: str) -> None:
    """Token ids outside the vocabulary would index past the logits inside a batched step,
    failing every request in the batch, so they stop here."""
    for token_id in token_ids:
        if not 0 <= token_id < vocab_size:
            raise APIError(400, f"{param} contains token id {token_id}, outside the vocabulary "
                                f"(0..{vocab_size - 1})", param=param)


@dataclass
class Choice:
    """One engine request behind one OpenAI choice, and how much of it was already sent."""

    index: int
    prompt_index: int
    request_id: str
    timer: SequenceTimer = field(default_factory=SequenceTimer)
    latest: RequestOutput | None = None
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    finish_reason: str | None = None


async def start_choices(
    state: ServerState,
    base_id: str,
    prompts: list[str | list[int]],
    num_choices_per_prompt: int,
    params_for_choice: Callable[[int], SamplingParams],
    client_id: str | None,
    choice_type: type[ChoiceT],
    priority: int = 0,
) -> tuple[StreamGroup, list[ChoiceT]]:
    """Add one engine request per (prompt, choice); on any rejection abort the ones already added.

    All requests are accepted before the first byte of the response goes out, so a prompt
    that does not fit is still a clean 400 even for streaming requests.
    """
    limit = state.settings.max_choices_per_request
    if len(prompts) * num_choices_per_prompt > limit:
        raise APIError(400, f"this request asks for {len(prompts)} prompt(s) x n={num_choices_per_prompt} = "
                            f"{len(prompts) * num_choices_per_prompt} choices; this server allows at most {limit} "
                            "per request (--max-choices-per-request): split it into several requests",
                       param="n" if len(prompts) == 1 else "prompt")
    group = StreamGroup(state.async_engine)
    choices: list[ChoiceT] = []
    requests = []
    for prompt_index, prompt in enumerate(prompts):
        engine_prompt: str | dict = prompt if isinstance(prompt, str) else {"prompt_token_ids": prompt}
        for choice_in_prompt in range(num_choices_per_prompt):
            index = prompt_index * num_choices_per_prompt + choice_in_prompt
            choice = choice_type(index=index, prompt_index=prompt_index, request_id=f"{base_id}-{index}")
            choices.append(choice)
            requests.append((choice.request_id, engine_prompt, params_for_choice(choice_in_prompt)))
    try:
        await group.add_all(requests, client_id, priority)
    except EngineDeadError as error:
        raise APIError(503, str(error)) from error
    except ValueError as error:  # PromptTooLongError included
        rejected = next((choice for choice in choices if choice.request_id == group.rejected_request_id), None)
        where = f" (prompt {rejected.prompt_index})" if rejected is not None and len(prompts) > 1 else ""
        too_long = isinstance(error, PromptTooLongError)
        raise APIError(400, f"{error}{where}", param="prompt" if too_long else None,
                       code="context_length_exceeded" if too_long else None) from error
    return group, choices


def record_finished(state: ServerState, choices: list[Choice]) -> None:
    """Count every choice once, whatever ended it (a choice cut short counts as abort)."""
    for choice in choices:
        state.metrics.observe_finished(choice.timer, choice.finish_reason or "abort")
        choice.finish_reason = choice.finish_reason or "abort"


def usage_dict(num_prompt_tokens: int, num_completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": num_prompt_tokens,
        "completion_tokens": num_completion_tokens,
        "total_tokens": num_prompt_tokens + num_completion_tokens,
    }


def sse_event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"


class EngineStreamingResponse(StreamingResponse):
    """An SSE response that aborts its engine requests however the response ends.

    Starlette cancels the response task when the client disconnects; the body generator may
    then be parked at a `yield` where no `finally` runs until garbage collection. Aborting
    here instead frees the KV blocks deterministically.
    """

    def __init__(self, content: AsyncIterator[bytes], group: StreamGroup) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._group = group

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._group.abort()


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, but cancel it if the client disconnects first (non-streaming responses).

    Without this a client that gives up on a long non-streaming request would leave it
    running to the end, holding its KV blocks.
    """
    work_task = asyncio.ensure_future(work)

    async def wait_for_disconnect() -> None:
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(wait_for_disconnect())
    try:
        await asyncio.wait({work_task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not work_task.done():
            work_task.cancel()
        watcher.cancel()
    if work_task.cancelled() or not work_task.done():
        try:
            await work_task
        except asyncio.CancelledError:
            pass
        raise ClientDisconnected()
    return work_task.result()


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refusing more than `limit` bytes with 413 before buffering it all."""
    too_large = APIError(413, f"the request body is larger than this server's limit of {limit} bytes "
                              "(start the server with a larger --max-request-body-bytes)",
                         code="request_too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)

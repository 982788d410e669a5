"""POST /v1/chat/completions: messages in, the assistant's reply (optionally streamed) out.

The prompt is the tokenizer's own chat template applied to the messages, so the model sees
exactly the format it was trained on; the server never formats chat turns itself.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fitserve.engine.async_engine import EngineStepError, StreamGroup
from fitserve.outputs import PositionLogprobs, RequestOutput
from fitserve.server.errors import APIError, error_body
from fitserve.server.protocol import ChatCompletionRequest
from fitserve.server.serving_common import (
    client_id_of,
    SSE_DONE, Choice, ClientDisconnected, EngineStreamingResponse, ServerState, cancel_on_disconnect,
    check_model_name, make_sampling_params, new_request_id, record_finished, sse_event, start_choices, usage_dict,
)
from fitserve.server.tokens import token_text


def chat_prompt_token_ids(tokenizer: Any, body: ChatCompletionRequest) -> list[int]:
    """Render the messages with the tokenizer's chat template; template errors are the client's 400."""
    messages = []
    for message in body.messages:
        entry: dict[str, Any] = {"role": message.role, "content": message.text()}
        if message.name is not None:
            entry["name"] = message.name
        if message.tool_call_id is not None:
            entry["tool_call_id"] = message.tool_call_id
        messages.append(entry)
    if not getattr(tokenizer, "chat_template", None):
        raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions with a plain prompt")
    template_kwargs = body.chat_template_kwargs or {}
    reserved = sorted(set(template_kwargs) & set(inspect.signature(tokenizer.apply_chat_template).parameters))
    if reserved:
        raise APIError(400, f"chat_template_kwargs may not set {', '.join(reserved)}: those are the server's "
                            "own arguments of the template call", param="chat_template_kwargs")
    try:
        token_ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=body.add_generation_prompt,
            continue_final_message=body.continue_final_message, tokenize=True, return_dict=False,
            **template_kwargs,
        )
    except Exception as error:  # noqa: BLE001 - templates raise (jinja) errors for message orders they refuse
        raise APIError(400, f"the chat template rejected these messages: {error}", param="messages") from error
    return list(token_ids)


@dataclass
class _ChatChoice(Choice):
    logprob_entries: list[dict[str, Any]] = field(default_factory=list)


def _logprob_entry(tokenizer: Any, token_id: int, position: PositionLogprobs, num_top: int) -> dict[str, Any]:
    """OpenAI's chat logprob entry: the sampled token plus its `num_top` best alternatives."""

    def describe(logprob: float, text: str) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    chosen = position.get(token_id)
    ranked = sorted(position.items(), key=lambda item: item[1].rank)[:num_top]
    return {
        **describe(chosen.logprob if chosen else float("-inf"), token_text(tokenizer, token_id, chosen)),
        "top_logprobs": [describe(other.logprob, token_text(tokenizer, other_id, other)) for other_id, other in ranked],
    }


def _advance(choice: _ChatChoice, output: RequestOutput, tokenizer: Any, num_top: int | None) -> str:
    """Fold one cumulative output into the choice; returns the text not yet sent."""
    completion = output.outputs[0]
    new_text = completion.text[choice.num_sent_chars:]
    choice.num_sent_chars = len(completion.text)
    if num_top is not None and completion.logprobs is not None:
        for offset, token_id in enumerate(completion.token_ids[choice.num_sent_tokens:]):
            position = completion.logprobs[choice.num_sent_tokens + offset]
            choice.logprob_entries.append(_logprob_entry(tokenizer, token_id, position, num_top))
    choice.num_sent_tokens = len(completion.token_ids)
    choice.timer.saw_tokens(len(completion.token_ids))
    choice.latest = output
    if output.finished:
        choice.finish_reason = completion.finish_reason
    return new_text


def _take_logprobs(choice: _ChatChoice, wanted: bool) -> dict[str, Any] | None:
    if not wanted:
        return None
    entries, choice.logprob_entries = choice.logprob_entries, []
    return {"content": entries}


def _usage(choices: dict[str, _ChatChoice], num_prompt_tokens: int) -> dict[str, int]:
    completion_tokens = sum(len(choice.latest.outputs[0].token_ids) for choice in choices.values() if choice.latest)
    return usage_dict(num_prompt_tokens, completion_tokens)


async def create_chat_completion(state: ServerState, body: ChatCompletionRequest, raw_request: Request) -> Any:
    """Validate, render the template, start the engine requests, then stream or collect."""
    check_model_name(state, body.model)
    engine = state.async_engine
    tokenizer = engine.tokenizer
    prompt_token_ids = chat_prompt_token_ids(tokenizer, body)
    num_top = (body.top_logprobs or 0) if body.logprobs else None

    def params_for_choice(choice_in_prompt: int):
        return make_sampling_params(
            body, max_tokens=body.output_token_limit, logprobs=num_top, prompt_logprobs=None,
            seed=None if body.seed is None else body.seed + choice_in_prompt, vocab_size=engine.vocab_size,
        )

    request_id = new_request_id("chatcmpl")
    group, choice_list = await start_choices(
        state, request_id, [prompt_token_ids], body.n, params_for_choice, client_id_of(raw_request, body),
        _ChatChoice, body.priority,
    )
    choices = {choice.request_id: choice for choice in choice_list}
    header = {"id": request_id, "created": int(time.time()), "model": state.settings.model_name}
    args = (state, body, group, choices, len(prompt_token_ids), header, num_top)
    if body.stream:
        return EngineStreamingResponse(_stream(*args), group)
    try:
        return await cancel_on_disconnect(raw_request, _collect(*args))
    except ClientDisconnected:
        return Response(status_code=499)


async def _collect(
    state: ServerState, body: ChatCompletionRequest, group: StreamGroup, choices: dict[str, _ChatChoice],
    num_prompt_tokens: int, header: dict, num_top: int | None,
) -> dict[str, Any]:
    tokenizer = state.async_engine.tokenizer
    try:
        async for output in group:
            _advance(choices[output.request_id], output, tokenizer, num_top)
    except EngineStepError as error:
        raise APIError(500, str(error)) from error
    finally:
        record_finished(state, list(choices.values()))
    ordered = sorted(choices.values(), key=lambda choice: choice.index)
    return {
        **header,
        "object": "chat.completion",
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.latest.outputs[0].text if choice.latest else ""},
                "logprobs": _take_logprobs(choice, num_top is not None),
                "finish_reason": choice.finish_reason,
                "stop_reason": choice.latest.outputs[0].stop_reason if choice.latest else None,
            }
            for choice in ordered
        ],
        "usage": _usage(choices, num_prompt_tokens),
    }


async def _stream(
    state: ServerState, body: ChatCompletionRequest, group: StreamGroup, choices: dict[str, _ChatChoice],
    num_prompt_tokens: int, header: dict, num_top: int | None,
) -> AsyncIterator[bytes]:
    tokenizer = state.async_engine.tokenizer
    chunk_header = {**header, "object": "chat.completion.chunk"}

    usage_in_every_chunk = body.stream_options is not None and body.stream_options.usage_in_every_chunk

    def chunk(choice: _ChatChoice, delta: dict[str, Any], finish_reason: str | None) -> bytes:
        event = {**chunk_header, "choices": [{
            "index": choice.index, "delta": delta, "logprobs": _take_logprobs(choice, num_top is not None),
            "finish_reason": finish_reason,
        }]}
        if usage_in_every_chunk:
            event["usage"] = _usage({choice.request_id: choice}, num_prompt_tokens)
        return sse_event(event)

    try:
        for choice in sorted(choices.values(), key=lambda choice: choice.index):
            yield chunk(choice, {"role": "assistant", "content": ""}, None)
        async for output in group:
            choice = choices[output.request_id]
            text = _advance(choice, output, tokenizer, num_top)
            finish_reason = choice.finish_reason if output.finished else None
            if text or finish_reason is not None:
                yield chunk(choice, {"content": text} if text else {}, finish_reason)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse_event({**chunk_header, "choices": [], "usage": _usage(choices, num_prompt_tokens)})
    except EngineStepError as error:
        yield sse_event(error_body(500, str(error)))
    finally:
        record_finished(state, list(choices.values()))
    yield SSE_DONE

"""POST /v1/completions: text or token-id prompts in, completions (optionally streamed) out.

Besides plain generation this is the scoring endpoint of evaluation harnesses: with
`echo` and `logprobs`, each choice carries the log-prob of every prompt token (the first
has none), which is what lm-eval's `local-completions` backend sums for log-likelihood
tasks. `max_tokens: 0` with `echo` scores a prompt without generating anything.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from fitserve.engine.async_engine import EngineStepError, StreamGroup
from fitserve.outputs import PositionLogprobs, RequestOutput
from fitserve.server.errors import APIError, error_body
from fitserve.server.protocol import CompletionRequest
from fitserve.server.serving_common import (
    client_id_of,
    SSE_DONE, Choice, ClientDisconnected, EngineStreamingResponse, ServerState, cancel_on_disconnect,
    check_model_name, make_sampling_params, new_request_id, record_finished, sse_event, start_choices, usage_dict,
)
from fitserve.server.tokens import decode, token_text


class _LogprobsBuilder:
    """Accumulates OpenAI's legacy `logprobs` object: parallel lists, one entry per token."""

    def __init__(self, tokenizer: Any, text_offset: int) -> None:
        self._tokenizer = tokenizer
        self._next_offset = text_offset
        self.tokens: list[str] = []
        self.token_logprobs: list[float | None] = []
        self.top_logprobs: list[dict[str, float] | None] = []
        self.text_offset: list[int] = []

    def add(self, token_id: int, position: PositionLogprobs | None) -> None:
        chosen = position.get(token_id) if position else None
        text = token_text(self._tokenizer, token_id, chosen)
        self.tokens.append(text)
        self.token_logprobs.append(chosen.logprob if chosen else None)
        if position is None:
            self.top_logprobs.append(None)
        else:
            ranked = sorted(position.items(), key=lambda item: item[1].rank)
            self.top_logprobs.append(
                {token_text(self._tokenizer, other_id, other): other.logprob for other_id, other in ranked}
            )
        self.text_offset.append(self._next_offset)
        self._next_offset += len(text)

    def take(self) -> dict[str, list]:
        """The entries added since the last take (whole object when called once at the end)."""
        taken = {"tokens": self.tokens, "token_logprobs": self.token_logprobs,
                 "top_logprobs": self.top_logprobs, "text_offset": self.text_offset}
        self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset = [], [], [], []
        return taken


@dataclass
class _CompletionChoice(Choice):
    """A choice plus its echo and logprobs state."""

    logprobs: _LogprobsBuilder | None = None
    echo_pending: bool = False


def _prompt_text(tokenizer: Any, prompt: str | list[int], output: RequestOutput) -> str:
    if isinstance(prompt, str):
        return prompt
    return decode(tokenizer, output.prompt_token_ids)


def _advance(
    choice: _CompletionChoice, output: RequestOutput, tokenizer: Any, prompt: str | list[int], score_only: bool,
) -> str:
    """Fold one cumulative output into the choice; returns the text not yet sent."""
    completion = output.outputs[0]
    new_text = ""
    if choice.echo_pending:
        choice.echo_pending = False
        new_text += _prompt_text(tokenizer, prompt, output)
        if choice.logprobs is not None:
            prompt_logprobs = output.prompt_logprobs or [None] * len(output.prompt_token_ids)
            for token_id, position in zip(output.prompt_token_ids, prompt_logprobs):
                choice.logprobs.add(token_id, position)
    if not score_only:
        new_text += completion.text[choice.num_sent_chars:]
        choice.num_sent_chars = len(completion.text)
        if choice.logprobs is not None and completion.logprobs is not None:
            for offset, token_id in enumerate(completion.token_ids[choice.num_sent_tokens:]):
                choice.logprobs.add(token_id, completion.logprobs[choice.num_sent_tokens + offset])
        choice.num_sent_tokens = len(completion.token_ids)
    choice.timer.saw_tokens(len(completion.token_ids))
    choice.latest = output
    if output.finished:
        choice.finish_reason = completion.finish_reason
    return new_text


async def create_completion(state: ServerState, body: CompletionRequest, raw_request: Request) -> Any:
    """Validate, start the engine requests, then stream or collect their outputs."""
    check_model_name(state, body.model)
    engine = state.async_engine
    prompts = body.prompts()
    score_only = body.max_tokens == 0
    want_prompt_logprobs = body.echo and body.logprobs is not None

    def params_for_choice(choice_in_prompt: int):
        return make_sampling_params(
            body, max_tokens=1 if score_only else body.max_tokens, logprobs=body.logprobs,
            prompt_logprobs=body.logprobs if want_prompt_logprobs else None,
            seed=None if body.seed is None else body.seed + choice_in_prompt, vocab_size=engine.vocab_size,
        )

    request_id = new_request_id("cmpl")
    group, choice_list = await start_choices(
        state, request_id, prompts, body.n, params_for_choice, client_id_of(raw_request, body),
        _CompletionChoice, body.priority,
    )
    choices = {choice.request_id: choice for choice in choice_list}
    for choice in choice_list:
        choice.echo_pending = body.echo
        choice.logprobs = _LogprobsBuilder(engine.tokenizer, 0) if body.logprobs is not None else None
    header = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": state.settings.model_name}
    stream_args = (state, body, group, choices, prompts, header, score_only)
    if body.stream:
        return EngineStreamingResponse(_stream(*stream_args), group)
    try:
        return await cancel_on_disconnect(raw_request, _collect(*stream_args))
    except ClientDisconnected:
        return Response(status_code=499)


def _choice_json(choice: _CompletionChoice, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "index": choice.index,
        "text": text,
        "logprobs": choice.logprobs.take() if choice.logprobs is not None else None,
        "finish_reason": finish_reason,
        "stop_reason": choice.latest.outputs[0].stop_reason if finish_reason and choice.latest else None,
    }


def _usage(choices: dict[str, _CompletionChoice], score_only: bool) -> dict[str, int]:
    prompt_tokens: dict[int, int] = {}
    completion_tokens = 0
    for choice in choices.values():
        if choice.latest is not None:
            prompt_tokens[choice.prompt_index] = len(choice.latest.prompt_token_ids)
            completion_tokens += 0 if score_only else len(choice.latest.outputs[0].token_ids)
    return usage_dict(sum(prompt_tokens.values()), completion_tokens)


async def _collect(
    state: ServerState, body: CompletionRequest, group: StreamGroup, choices: dict[str, _CompletionChoice],
    prompts: list, header: dict, score_only: bool,
) -> dict[str, Any]:
    texts = {request_id: "" for request_id in choices}
    tokenizer = state.async_engine.tokenizer
    try:
        async for output in group:
            choice = choices[output.request_id]
            texts[output.request_id] += _advance(choice, output, tokenizer, prompts[choice.prompt_index], score_only)
    except EngineStepError as error:
        raise APIError(500, str(error)) from error
    finally:
        record_finished(state, list(choices.values()))
    ordered = sorted(choices.values(), key=lambda choice: choice.index)
    return {
        **header,
        "choices": [
            _choice_json(choice, texts[choice.request_id], "length" if score_only else choice.finish_reason)
            for choice in ordered
        ],
        "usage": _usage(choices, score_only),
    }


async def _stream(
    state: ServerState, body: CompletionRequest, group: StreamGroup, choices: dict[str, _CompletionChoice],
    prompts: list, header: dict, score_only: bool,
) -> AsyncIterator[bytes]:
    tokenizer = state.async_engine.tokenizer
    usage_in_every_chunk = body.stream_options is not None and body.stream_options.usage_in_every_chunk
    try:
        async for output in group:
            choice = choices[output.request_id]
            text = _advance(choice, output, tokenizer, prompts[choice.prompt_index], score_only)
            finish_reason = ("length" if score_only else choice.finish_reason) if output.finished else None
            if not text and finish_reason is None:
                continue  # e.g. a step that only moved the prefill forward
            event = {**header, "choices": [_choice_json(choice, text, finish_reason)]}
            if usage_in_every_chunk:
                event["usage"] = _usage({choice.request_id: choice}, score_only)
            yield sse_event(event)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield sse_event({**header, "choices": [], "usage": _usage(choices, score_only)})
    except EngineStepError as error:
        yield sse_event(error_body(500, str(error)))
    finally:
        record_finished(state, list(choices.values()))
    yield SSE_DONE

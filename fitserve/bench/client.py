"""An async streaming client for OpenAI-compatible servers that timestamps every chunk.

Times come from `time.perf_counter` taken as each SSE line is parsed, so they include the
network and HTTP parsing, as a user of the server would see them. Output tokens are the
server's `usage.completion_tokens` (we ask for it with `stream_options.include_usage`);
servers that ignore that option are counted by chunks carrying text.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

import httpx

from fitserve.bench.records import RequestResult


@dataclass
class ClientOptions:
    base_url: str
    """Server root, e.g. http://127.0.0.1:8000 (the /v1 paths are added here)."""
    model: str
    """Value of the `model` field of every request."""
    endpoint: str = "completions"
    """completions (/v1/completions, text prompt) or chat (/v1/chat/completions, messages)."""
    request_timeout_s: float = 600.0
    """A request still running after this long is cancelled and counted as a timeout failure."""
    ignore_eos: bool = True
    """Ask the server to generate exactly max_tokens (vLLM's extension; fitserve honours it)."""
    temperature: float = 0.0
    api_key: str | None = None


class StreamClient:
    """One shared HTTP connection pool; `send` runs one streamed request and records it."""

    def __init__(self, options: ClientOptions) -> None:
        self.options = options
        self._http = self._new_pool()

    def _new_pool(self) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {self.options.api_key}"} if self.options.api_key else {}
        return httpx.AsyncClient(
            base_url=self.options.base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(self.options.request_timeout_s, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=None),
        )

    def reopen(self) -> None:
        """A fresh connection pool: an httpx pool cannot move to another event loop."""
        self._http = self._new_pool()

    async def close(self) -> None:
        await self._http.aclose()

    def _body(self, prompt_or_messages: str | list[dict], max_tokens: int,
              user: str | None = None) -> tuple[str, dict]:
        body: dict[str, Any] = {
            "model": self.options.model,
            "max_tokens": max_tokens,
            "temperature": self.options.temperature,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if self.options.ignore_eos:
            body["ignore_eos"] = True
        if user is not None:
            body["user"] = user
        if self.options.endpoint == "chat":
            messages = prompt_or_messages if isinstance(prompt_or_messages, list) else [
                {"role": "user", "content": prompt_or_messages}]
            body["messages"] = messages
            return "/v1/chat/completions", body
        if isinstance(prompt_or_messages, list):
            # Completions has no roles: a conversation becomes its turns joined as plain text.
            prompt_or_messages = "\n".join(message["content"] for message in prompt_or_messages)
        body["prompt"] = prompt_or_messages
        return "/v1/completions", body

    async def warm_up(self, prompt: str = "Hello") -> RequestResult:
        """One short request before measuring: opens a connection and initialises the HTTP
        stack, so the first measured request does not pay for that; also fails fast (with the
        server's own message) when the endpoint, model name or request shape is wrong."""
        result = RequestResult(request_id=-1, conversation_id=-1, turn_index=0, scheduled_s=0.0,
                               sent_s=0.0, input_tokens=0, requested_output_tokens=1)
        return await self.send(prompt, 1, result, time.perf_counter())

    async def send(self, prompt_or_messages: str | list[dict], max_tokens: int,
                   result: RequestResult, run_start: float, user: str | None = None) -> RequestResult:
        """Send one request and fill `result` (timings relative to its send time); `user` is
        the OpenAI field naming the client (multi-tenant workloads)."""
        path, body = self._body(prompt_or_messages, max_tokens, user)
        sent = time.perf_counter()
        result.sent_s = sent - run_start
        try:
            await asyncio.wait_for(self._stream(path, body, result, sent), self.options.request_timeout_s)
        except (asyncio.TimeoutError, httpx.TimeoutException):
            result.success, result.error = False, f"timeout: no complete answer within {self.options.request_timeout_s:g} s"
        except httpx.HTTPError as error:
            result.success, result.error = False, f"connection error: {type(error).__name__} {error}"
        if result.end_s is None:
            result.end_s = time.perf_counter() - sent
        return result

    async def _stream(self, path: str, body: dict, result: RequestResult, sent: float) -> None:
        usage_tokens: int | None = None
        text_parts: list[str] = []
        async with self._http.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode("utf-8", "replace")[:300]
                result.success, result.error = False, f"HTTP {response.status_code}: {detail}"
                return
            async for line in response.aiter_lines():
                now = time.perf_counter()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                try:
                    chunk = json.loads(payload)
                except json.JSONDecodeError:
                    result.success, result.error = False, f"bad stream: unreadable chunk {payload[:100]!r}"
                    return
                if "error" in chunk:
                    result.success, result.error = False, f"server error: {json.dumps(chunk['error'])[:300]}"
                    return
                text = _chunk_text(chunk)
                if text:
                    result.chunk_times_s.append(now - sent)
                    text_parts.append(text)
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens", usage_tokens)
                    if usage.get("prompt_tokens"):
                        result.input_tokens = int(usage["prompt_tokens"])
        result.end_s = time.perf_counter() - sent
        result.output_text = "".join(text_parts)
        if usage_tokens is not None:
            result.output_tokens, result.output_tokens_source = int(usage_tokens), "usage"
        else:
            result.output_tokens, result.output_tokens_source = len(result.chunk_times_s), "chunks"
        if not result.chunk_times_s:
            result.success, result.error = False, "empty answer: the stream carried no text"
            return
        result.success, result.error = True, None


def _chunk_text(chunk: dict) -> str:
    """Text of a completions or chat chunk ('' for role-only, usage-only and final chunks)."""
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "text" in choice:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    return delta.get("content") or ""


async def fetch_model_name(base_url: str, timeout_s: float = 30.0, api_key: str | None = None) -> str:
    """The first model id the server lists at /v1/models (what requests must name)."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(base_url=base_url.rstrip("/"), timeout=timeout_s, headers=headers) as http:
        response = await http.get("/v1/models")
        response.raise_for_status()
        models = response.json().get("data") or []
        if not models:
            raise RuntimeError(f"{base_url}/v1/models lists no model; pass --served-model-name")
        return str(models[0]["id"])

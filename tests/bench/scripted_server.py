"""A tiny scripted OpenAI-compatible streaming server for testing the bench client.

Each request's prompt (or last chat message) is a JSON script saying how to answer:
{"ttft_ms": 100, "itl_ms": 30, "tokens": 5, "tokens_per_chunk": 1, "usage": true,
 "status": 200, "hang_s": 0, "error_after": null}. The server sleeps exactly as scripted, so
the client's measured TTFT / ITL / E2E can be checked against the script. A prompt that is
not JSON gets a server with finite capacity: the first token takes 10 ms plus 25 ms for every
other request in flight, so latency grows with load as on a real server (for rate searches). It runs in its own
process (`python scripted_server.py PORT`) so it does not share the client's interpreter lock;
GET /stats returns the request bodies it received and the most requests it had in flight.
"""

from __future__ import annotations

import asyncio
import json
import sys

import uvicorn


class ScriptedServer:
    """Raw ASGI app: /health, /v1/models, /v1/completions and /v1/chat/completions."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.generation = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/health":
            await self._json(send, 200, {"status": "ok"})
            return
        if path == "/reset":
            # Requests still hanging from an earlier test must not count against the next one.
            self.bodies, self.max_in_flight, self.in_flight = [], 0, 0
            self.generation += 1
            await self._json(send, 200, {"status": "ok"})
            return
        if path == "/stats":
            await self._json(send, 200, {"bodies": self.bodies, "max_in_flight": self.max_in_flight})
            return
        if path == "/v1/models":
            await self._json(send, 200, {"object": "list", "data": [{"id": "scripted-model", "object": "model"}]})
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        request = json.loads(body)
        self.bodies.append(request)
        generation = self.generation
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await self._answer(path, request, send)
        finally:
            if generation == self.generation:
                self.in_flight -= 1

    async def _answer(self, path: str, request: dict, send) -> None:
        if request.get("model") != "scripted-model":
            await self._json(send, 404, {"error": {"message": f"model {request.get('model')!r} does not exist"}})
            return
        chat = path.endswith("chat/completions")
        prompt = request["messages"][-1]["content"] if chat else request["prompt"]
        try:
            script = json.loads(prompt)
        except json.JSONDecodeError:
            script = {"ttft_ms": 10 + 25 * (self.in_flight - 1), "itl_ms": 10}
        status = script.get("status", 200)
        if status != 200:
            await self._json(send, status, {"error": {"message": "scripted failure"}})
            return
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await asyncio.sleep(script.get("hang_s", 0))
        tokens = script.get("tokens", request.get("max_tokens", 4))
        per_chunk = script.get("tokens_per_chunk", 1)
        sent_tokens = 0
        await asyncio.sleep(script.get("ttft_ms", 10) / 1e3)
        while sent_tokens < tokens:
            if script.get("error_after") is not None and sent_tokens >= script["error_after"]:
                await self._event(send, {"error": {"message": "scripted stream error"}})
                break
            count = min(per_chunk, tokens - sent_tokens)
            text = " tok" * count
            choice = ({"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text})
            await self._event(send, {"id": "x", "choices": [choice]})
            sent_tokens += count
            if sent_tokens < tokens:
                await asyncio.sleep(script.get("itl_ms", 10) / 1e3)
        if script.get("usage", True) and request.get("stream_options", {}).get("include_usage"):
            await self._event(send, {"id": "x", "choices": [],
                                     "usage": {"prompt_tokens": 7, "completion_tokens": sent_tokens}})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})

    @staticmethod
    async def _event(send, payload: dict) -> None:
        await send({"type": "http.response.body", "body": f"data: {json.dumps(payload)}\n\n".encode(),
                    "more_body": True})

    @staticmethod
    async def _json(send, status: int, payload: dict) -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(payload).encode()})



if __name__ == "__main__":
    uvicorn.run(ScriptedServer(), host="127.0.0.1", port=int(sys.argv[1]), log_level="warning",
                lifespan="off")

"""Whatever a client sends, the answer is a 4xx in OpenAI's error format with a message that
says what was wrong, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

from .conftest import API_KEY, MODEL_NAME, RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
USER_MESSAGE = [{"role": "user", "content": "hi"}]

# (name, path, JSON body or raw bytes, expected status, words the message must contain)
CASES = [
    ("invalid JSON", COMPLETIONS, b'{"prompt": "hi",', 400, ["not valid JSON"]),
    ("body is an array", COMPLETIONS, b"[1, 2]", 400, ["JSON object"]),
    ("empty body", COMPLETIONS, b"", 400, ["empty"]),
    ("missing prompt", COMPLETIONS, {"model": MODEL_NAME}, 400, ["prompt", "required"]),
    ("max_tokens is a string", COMPLETIONS, {"prompt": "hi", "max_tokens": "ten"}, 400, ["max_tokens", "integer"]),
    ("negative max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": -5}, 400, ["max_tokens"]),
    ("max_tokens 0 without echo", COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, 400, ["max_tokens", "echo"]),
    ("negative temperature", COMPLETIONS, {"prompt": "hi", "temperature": -1.0}, 400, ["temperature", ">= 0"]),
    ("temperature NaN", COMPLETIONS, b'{"prompt": "hi", "temperature": NaN}', 400, ["temperature", "finite"]),
    ("seed beyond 64 bits", COMPLETIONS, {"prompt": "hi", "seed": 2**70}, 400, ["seed"]),
    ("n above the limit", COMPLETIONS, {"prompt": "hi", "n": 1000}, 400, ["n: ", "128"]),
    ("stop_token_ids outside the vocabulary", COMPLETIONS, {"prompt": "hi", "stop_token_ids": [70000]}, 400,
     ["stop_token_ids", "70000"]),
    ("temperature is a list", COMPLETIONS, {"prompt": "hi", "temperature": [1]}, 400, ["temperature"]),
    ("fractional max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 2.5}, 400, ["max_tokens", "fractional"]),
    ("top_p zero", COMPLETIONS, {"prompt": "hi", "top_p": 0.0}, 400, ["top_p", "(0, 1]", "temperature 0"]),
    ("top_p above one", COMPLETIONS, {"prompt": "hi", "top_p": 1.5}, 400, ["top_p"]),
    ("n zero", COMPLETIONS, {"prompt": "hi", "n": 0}, 400, ["n: ", "greater than or equal to 1"]),
    ("presence_penalty out of range", COMPLETIONS, {"prompt": "hi", "presence_penalty": 3}, 400, ["presence_penalty"]),
    ("logprobs too many", COMPLETIONS, {"prompt": "hi", "logprobs": 30}, 400, ["logprobs"]),
    ("unknown field", COMPLETIONS, {"prompt": "hi", "temprature": 0.5}, 400, ["unknown field", "temprature"]),
    ("prompt of mixed types", COMPLETIONS, {"prompt": ["hi", 3]}, 400, ["prompt must be"]),
    ("empty prompt list", COMPLETIONS, {"prompt": []}, 400, ["prompt", "empty"]),
    ("token id outside the vocabulary", COMPLETIONS, {"prompt": [1, 99999]}, 400, ["99999", "vocabulary"]),
    ("stream_options without stream", COMPLETIONS, {"prompt": "hi", "stream_options": {"include_usage": True}},
     400, ["stream_options"]),
    ("min_tokens above max_tokens", COMPLETIONS, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400, ["min_tokens"]),
    ("prompt longer than the context", COMPLETIONS, {"prompt": "fox " * 400}, 400,
     ["maximum context length is 256"]),
    ("one of several prompts too long", COMPLETIONS, {"prompt": ["hi", "fox " * 400], "n": 2}, 400,
     ["maximum context length", "(prompt 1)"]),
    ("prompt plus max_tokens over the context", COMPLETIONS, {"prompt": "hi", "max_tokens": 1000}, 400,
     ["maximum context length", "max_tokens"]),
    ("logit_bias", COMPLETIONS, {"prompt": "hi", "logit_bias": {"5": 1.0}}, 400, ["logit_bias"]),
    ("empty messages", CHAT, {"messages": []}, 400, ["messages", "at least 1"]),
    ("missing messages", CHAT, {"model": MODEL_NAME}, 400, ["messages", "required"]),
    ("unknown role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, 400, ["messages.0.role"]),
    ("image content", CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, ["messages.0.content", "images"]),
    ("message is a string", CHAT, {"messages": ["hi"]}, 400, ["messages.0"]),
    ("top_logprobs without logprobs", CHAT, {"messages": USER_MESSAGE, "top_logprobs": 2}, 400, ["top_logprobs"]),
    ("chat max_completion_tokens negative", CHAT, {"messages": USER_MESSAGE, "max_completion_tokens": -1}, 400,
     ["max_completion_tokens"]),
    ("chat too long", CHAT, {"messages": [{"role": "user", "content": "fox " * 400}]}, 400, ["maximum context length"]),
    ("structured output", CHAT, {"messages": USER_MESSAGE, "response_format": {"type": "json_object"}}, 400,
     ["response_format", "json_object", "structured output"]),
    ("tools", CHAT, {"messages": USER_MESSAGE, "tools": [{"type": "function", "function": {"name": "f"}}]}, 400,
     ["tools", "tool calling"]),
    ("tool_choice auto", CHAT, {"messages": USER_MESSAGE, "tool_choice": "auto"}, 400, ["tool_choice"]),
    ("continue_final_message with a generation prompt", CHAT,
     {"messages": USER_MESSAGE, "continue_final_message": True}, 400, ["continue_final_message", "add_generation_prompt"]),
    ("chat_template_kwargs overriding the call", CHAT,
     {"messages": USER_MESSAGE, "chat_template_kwargs": {"tokenize": False}}, 400, ["chat_template_kwargs", "tokenize"]),
    ("unknown model", COMPLETIONS, {"model": "gpt-4", "prompt": "hi"}, 404, ["gpt-4", MODEL_NAME]),
    ("too many choices in one request", COMPLETIONS, {"prompt": ["hi"] * 200, "n": 8}, 400,
     ["200 prompt(s) x n=8 = 1600 choices", "--max-choices-per-request"]),
    ("oversized body", COMPLETIONS, {"prompt": "x" * 100_000}, 413, ["larger than", "65536"]),
]


@pytest.mark.parametrize("name, path, body, status, words", CASES, ids=[case[0] for case in CASES])
def test_malformed_request_gets_its_4xx(server: RunningServer, name: str, path: str, body, status: int,
                                        words: list[str]) -> None:
    content = body if isinstance(body, bytes) else httpx.Request("POST", "/", json=body).content
    response = httpx.post(f"{server.base_url}{path}", content=content,
                          headers=AUTH | {"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key"}, {"Authorization": API_KEY}],
                         ids=["no key", "wrong key", "no Bearer scheme"])
def test_missing_or_wrong_api_key_is_401(server: RunningServer, headers: dict) -> None:
    for path in (COMPLETIONS, CHAT):
        response = httpx.post(f"{server.base_url}{path}", json={"prompt": "hi"}, headers=headers, timeout=30)
        assert response.status_code == 401
        assert "API key" in response.json()["error"]["message"]
    assert httpx.get(f"{server.base_url}/v1/models", headers=headers, timeout=30).status_code == 401
    # Health and metrics stay open for probes and scrapers.
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200


def test_unknown_route_and_wrong_method_answer_in_openai_format(server: RunningServer) -> None:
    missing = httpx.get(f"{server.base_url}/v1/engines", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and "/v1/engines" in missing.json()["error"]["message"]
    wrong_method = httpx.get(f"{server.base_url}{COMPLETIONS}", headers=AUTH, timeout=30)
    assert wrong_method.status_code == 405 and "GET" in wrong_method.json()["error"]["message"]
    assert wrong_method.headers["Allow"] == "POST"  # HTTP requires it on a 405


def test_integral_floats_are_integers_as_in_vllm(server: RunningServer) -> None:
    # JSON has one number type; clients generated from OpenAI's spec may send 3.0 for 3.
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3.0, "n": 2.0, "temperature": 0, "ignore_eos": True}
    response = httpx.post(f"{server.base_url}{COMPLETIONS}", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2 and response.json()["usage"]["completion_tokens"] == 6


def test_non_ascii_api_key_sent_as_utf8_matches() -> None:
    from types import SimpleNamespace

    from starlette.requests import Request

    from fitserve.server.app import require_api_key
    from fitserve.server.errors import APIError

    key = "clé-ünïcode-鍵"
    app = SimpleNamespace(state=SimpleNamespace(fitserve=SimpleNamespace(settings=SimpleNamespace(api_key=key, api_keys=None))))

    def request_with(header_value: bytes) -> Request:
        return Request({"type": "http", "headers": [(b"authorization", header_value)], "app": app})

    require_api_key(request_with(f"Bearer {key}".encode("utf-8")))  # what curl and httpx send
    with pytest.raises(APIError):
        require_api_key(request_with("Bearer clé-ünïcode-鍵x".encode("utf-8")))


def test_streaming_request_that_does_not_fit_fails_before_streaming(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL_NAME, prompt="fox " * 400, max_tokens=4, stream=True)
    assert "maximum context length" in str(caught.value)


def test_openai_client_sees_typed_errors(server: RunningServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model=MODEL_NAME, prompt="hi", temperature=-2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=USER_MESSAGE)
    wrong_key = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()


def test_server_still_serves_after_bad_input(client: openai.OpenAI, server: RunningServer) -> None:
    response = client.completions.create(model=MODEL_NAME, prompt="hello", max_tokens=3, temperature=0)
    assert response.usage.completion_tokens >= 1
    stats = server.wait_until_idle()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_random_bodies_never_get_a_5xx(server: RunningServer) -> None:
    """Hundreds of valid bodies with one to four fields changed to random, often wrong, values:
    each is answered, none with a server error, and afterwards every KV block is free."""
    import random

    generator = random.Random(0)
    odd_values = [None, True, -1, 0, 1, 2, 3, 2.5, -0.5, 1e9, "", "x", [], [1], ["a"], {}, {"a": 1}, [[1, 2]], 2**70]
    fields = {
        "model": [MODEL_NAME, "other"], "prompt": ["hello", ["a", "b"], [1, 5, 9], [[1, 2], [3]], "fox " * 300],
        "messages": [USER_MESSAGE, [{"role": "assistant", "content": None}], [{"role": "user"}]],
        "max_tokens": [1, 2, 3], "max_completion_tokens": [1, 2], "temperature": [0.0, 0.5, 1.0],
        "top_p": [0.5, 1.0], "n": [1, 2], "stop": ["a", ["a", "b"]], "seed": [1, 42],
        "logprobs": [0, 2, True], "top_logprobs": [0, 2], "echo": [True, False], "stream": [True, False],
        "presence_penalty": [0.5], "frequency_penalty": [-0.5], "top_k": [5], "min_p": [0.1],
        "repetition_penalty": [1.1], "ignore_eos": [True], "min_tokens": [1], "user": ["alice"],
        "stop_token_ids": [[5], [600]], "stream_options": [{"include_usage": True}],
    }
    bases = {COMPLETIONS: {"prompt": "hello", "max_tokens": 2}, CHAT: {"messages": USER_MESSAGE, "max_tokens": 2}}
    statuses = []
    with httpx.Client(base_url=server.base_url, headers=AUTH, timeout=60) as http:
        for _ in range(200):
            path = generator.choice([COMPLETIONS, CHAT])
            body = dict(bases[path])
            for name in generator.sample(sorted(fields), generator.randint(1, 4)):
                choices = fields[name] if generator.random() < 0.7 else odd_values
                body[name] = generator.choice(choices)
            response = http.post(path, json=body)
            statuses.append(response.status_code)
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                assert response.json()["error"]["message"]
    assert 200 in statuses and 400 in statuses
    stats = server.wait_until_idle()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_client_that_hangs_up_while_sending_its_body_is_logged_as_a_disconnect(server: RunningServer) -> None:
    import logging
    import socket
    import time
    from urllib.parse import urlparse

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = records.append  # neither fitserve's nor uvicorn's loggers propagate to the root
    loggers = [logging.getLogger("fitserve"), logging.getLogger("uvicorn.error")]
    for logger in loggers:
        logger.addHandler(handler)

    def messages() -> list[str]:
        return [record.getMessage() for record in records]

    try:
        address = urlparse(server.base_url)
        with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
            sock.sendall(f"POST {COMPLETIONS} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 5000\r\n\r\n{\"prompt\": ".encode())
            time.sleep(0.2)
        deadline = time.monotonic() + 10
        while not any("disconnected" in message or "error" in message for message in messages()) \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)  # a second, unwanted record would come right after the first
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert "client disconnected while sending its request body (POST /v1/completions)" in messages()
    assert [record for record in records if record.levelno >= logging.ERROR] == [], messages()
    assert httpx.get(f"{server.base_url}/health", timeout=30).status_code == 200

"""Requests exactly as independent clients send them (their body shapes, read from their
source), so a client's extension field cannot again turn every request into a 400."""

from __future__ import annotations

import json

import httpx

from .conftest import API_KEY, MODEL_NAME, RunningServer

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The quick brown fox"


def sse_payloads(server: RunningServer, path: str, body: dict) -> list[dict | str]:
    """The decoded `data:` events of one streamed response; `[DONE]` stays a string."""
    events: list[dict | str] = []
    with httpx.stream("POST", f"{server.base_url}{path}", json=body, headers=AUTH, timeout=60) as response:
        assert response.status_code == 200, response.read().decode()
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def check_continuous_usage(events: list[dict | str], output_tokens: int) -> None:
    """Every choice chunk carries usage so far; the last chunk before [DONE] has the total."""
    assert events[-1] == "[DONE]"
    *chunks, final = events[:-1]
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == output_tokens
    prompt_tokens = final["usage"]["prompt_tokens"]
    counts = []
    for chunk in chunks:
        usage = chunk["usage"]
        assert usage["prompt_tokens"] == prompt_tokens
        assert usage["total_tokens"] == prompt_tokens + usage["completion_tokens"]
        counts.append(usage["completion_tokens"])
    assert counts == sorted(counts) and counts[-1] == output_tokens
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_guidellm_text_completions_shape(server: RunningServer) -> None:
    # GuideLLM 0.8's /v1/completions body for a fixed output length, streamed.
    body = {"model": MODEL_NAME, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_tokens": 6, "stop": None, "ignore_eos": True, "prompt": PROMPT}
    check_continuous_usage(sse_payloads(server, "/v1/completions", body), output_tokens=6)


def test_guidellm_chat_completions_shape(server: RunningServer) -> None:
    # GuideLLM 0.8's /v1/chat/completions body: content as a list of text parts.
    body = {"model": MODEL_NAME, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
            "max_completion_tokens": 5, "stop": None, "ignore_eos": True,
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPT}]}]}
    events = sse_payloads(server, "/v1/chat/completions", body)
    check_continuous_usage(events, output_tokens=5)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert events[0]["usage"]["completion_tokens"] == 0


def test_guidellm_startup_probes(server: RunningServer) -> None:
    # Before a run GuideLLM checks GET /health and reads the model list, both with its key.
    assert httpx.get(f"{server.base_url}/health", headers=AUTH, timeout=30).status_code == 200
    models = httpx.get(f"{server.base_url}/v1/models", headers=AUTH, timeout=30).json()
    assert [item["id"] for item in models["data"]] == [MODEL_NAME]


def test_continuous_usage_stats_without_include_usage_adds_nothing(server: RunningServer) -> None:
    # vLLM only sends usage in chunks when include_usage is set as well.
    body = {"model": MODEL_NAME, "stream": True, "stream_options": {"continuous_usage_stats": True},
            "max_tokens": 3, "ignore_eos": True, "prompt": PROMPT}
    events = sse_payloads(server, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    assert all("usage" not in event for event in events[:-1])


def post(server: RunningServer, path: str, body: dict) -> dict:
    response = httpx.post(f"{server.base_url}{path}", json=body, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_vllm_chat_extensions_and_harmless_openai_fields(server: RunningServer, reference_llm) -> None:
    # What clients written for vLLM (and OpenAI's own client, for text output) send.
    tokenizer = reference_llm.engine.tokenizer
    messages = [{"role": "user", "content": "Tell me"}, {"role": "assistant", "content": "Once upon"}]
    reply = post(server, "/v1/chat/completions", {
        "model": MODEL_NAME, "messages": messages, "max_tokens": 2, "continue_final_message": True,
        "add_generation_prompt": False, "chat_template_kwargs": {"enable_thinking": False},
        "response_format": {"type": "text"}, "tool_choice": "none", "tools": []})
    expected = tokenizer.apply_chat_template(messages, continue_final_message=True, tokenize=True, return_dict=False)
    assert reply["usage"]["prompt_tokens"] == len(expected)
    assert tokenizer.decode(expected).endswith("Once upon")  # the reply continues this very message

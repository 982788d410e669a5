"""The official `openai` client against a live server: outputs equal `LLM.generate`'s."""

from __future__ import annotations

import httpx
import openai
import pytest

from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

from .conftest import API_KEY, MODEL_NAME, RunningServer, run_async

PROMPTS = ["The quick brown fox", "Once upon a time", "Serving language models"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8)


def reference_texts(reference_llm: LLM, prompts: list, params: SamplingParams = GREEDY) -> list[str]:
    return [completion.text for output in reference_llm.generate(prompts, params) for completion in output.outputs]


def test_completions_non_streaming_match_llm_generate(client: openai.OpenAI, reference_llm: LLM) -> None:
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=8, temperature=0)
    reference = reference_llm.generate(PROMPTS, GREEDY)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert [choice.text for choice in response.choices] == [output.outputs[0].text for output in reference]
    assert all(choice.finish_reason == output.outputs[0].finish_reason
               for choice, output in zip(response.choices, reference))
    assert response.model == MODEL_NAME
    assert response.usage.prompt_tokens == sum(len(output.prompt_token_ids) for output in reference)
    assert response.usage.completion_tokens == sum(len(output.outputs[0].token_ids) for output in reference)
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens


def test_completions_streaming_with_usage_match_llm_generate(client: openai.OpenAI, reference_llm: LLM) -> None:
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    text, finish_reasons, usage = "", [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
            continue
        text += chunk.choices[0].text
        finish_reasons.append(chunk.choices[0].finish_reason)
    [reference] = reference_llm.generate(PROMPTS[0], GREEDY)
    assert text == reference.outputs[0].text
    assert finish_reasons[-1] == reference.outputs[0].finish_reason
    assert all(reason is None for reason in finish_reasons[:-1])
    assert usage is not None and usage.completion_tokens == len(reference.outputs[0].token_ids)
    assert usage.prompt_tokens == len(reference.prompt_token_ids)


def test_raw_stream_is_server_sent_events_ending_with_done(server: RunningServer) -> None:
    body = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 4, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.base_url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(event.startswith("data: ") for event in events)
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 2


def test_chat_non_streaming_and_streaming_match_llm_chat(client: openai.OpenAI, reference_llm: LLM) -> None:
    [reference] = reference_llm.chat(MESSAGES, GREEDY)
    response = client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == reference.outputs[0].text
    assert response.choices[0].finish_reason == reference.outputs[0].finish_reason
    assert response.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert response.usage.completion_tokens == len(reference.outputs[0].token_ids)

    stream = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_completion_tokens=8, temperature=0, stream=True,
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == reference.outputs[0].text
    assert chunks[-1].choices[0].finish_reason == reference.outputs[0].finish_reason


def test_async_client_streaming_and_not(make_async_client, reference_llm: LLM) -> None:
    [chat_reference] = reference_llm.chat(MESSAGES, GREEDY)
    completion_references = reference_texts(reference_llm, PROMPTS)

    async def talk() -> tuple[list[str], str, str, str]:
        async with make_async_client() as client:
            completions = await client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=8, temperature=0)
            streamed = ""
            async for chunk in await client.completions.create(
                model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=8, temperature=0, stream=True
            ):
                streamed += chunk.choices[0].text
            chat = await client.chat.completions.create(model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0)
            chat_streamed = ""
            async for chunk in await client.chat.completions.create(
                model=MODEL_NAME, messages=MESSAGES, max_tokens=8, temperature=0, stream=True
            ):
                chat_streamed += chunk.choices[0].delta.content or ""
            return [choice.text for choice in completions.choices], streamed, chat.choices[0].message.content, chat_streamed

    completion_texts, streamed, chat_text, chat_streamed = run_async(talk())
    assert completion_texts == completion_references
    assert streamed == completion_references[2]
    assert chat_text == chat_streamed == chat_reference.outputs[0].text


def test_token_id_prompts(client: openai.OpenAI, reference_llm: LLM) -> None:
    token_prompts = [[1, 40, 41, 42, 43], [1, 99, 7, 250]]
    response = client.completions.create(model=MODEL_NAME, prompt=token_prompts, max_tokens=6, temperature=0)
    params = SamplingParams(temperature=0.0, max_tokens=6)
    expected = reference_texts(reference_llm, [{"prompt_token_ids": ids} for ids in token_prompts], params)
    assert [choice.text for choice in response.choices] == expected
    assert response.usage.prompt_tokens == 9


def test_n_choices_use_consecutive_seeds(client: openai.OpenAI, reference_llm: LLM) -> None:
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=1.0, n=3, seed=7,
    )
    params = SamplingParams(n=3, temperature=1.0, max_tokens=6, seed=7)
    assert [choice.index for choice in response.choices] == [0, 1, 2]
    assert [choice.text for choice in response.choices] == reference_texts(reference_llm, [PROMPTS[0]], params)


def test_n_choices_for_each_of_several_prompts_are_indexed_prompt_major(client: openai.OpenAI) -> None:
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], max_tokens=3, temperature=0, n=2)
    texts = [choice.text for choice in sorted(response.choices, key=lambda choice: choice.index)]
    # Greedy: both choices of a prompt agree, and index = prompt_index * n + choice.
    assert texts[0] == texts[1] and texts[2] == texts[3]
    assert response.usage.completion_tokens == 4 * 3


@pytest.mark.parametrize("extra", [
    {"stop": ["or"]},
    {"presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"repetition_penalty": 1.3},
    {"temperature": 0.9, "top_k": 5, "min_p": 0.05, "top_p": 0.9, "seed": 3},
    {"min_tokens": 4, "ignore_eos": True},
])
def test_sampling_parameters_reach_the_engine(client: openai.OpenAI, reference_llm: LLM, extra: dict) -> None:
    body = {"temperature": 0.0} | extra
    openai_fields = {key: body[key] for key in ("stop", "presence_penalty", "frequency_penalty", "temperature",
                                                 "top_p", "seed") if key in body}
    vllm_extras = {key: value for key, value in body.items() if key not in openai_fields}
    response = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=10, extra_body=vllm_extras, **openai_fields,
    )
    [expected] = reference_texts(reference_llm, [PROMPTS[0]], SamplingParams(max_tokens=10, **body))
    assert response.choices[0].text == expected


def test_echo_with_logprobs_returns_prompt_logprobs(client: openai.OpenAI, reference_llm: LLM) -> None:
    """The lm-eval `local-completions` log-likelihood request: echo, logprobs=1, max_tokens=1."""
    prompt_ids = [1, 30, 31, 32, 33, 34]
    response = client.completions.create(
        model=MODEL_NAME, prompt=prompt_ids, max_tokens=1, temperature=0, echo=True, logprobs=1,
    )
    [reference] = reference_llm.generate(
        {"prompt_token_ids": prompt_ids}, SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1, logprobs=1)
    )
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt_ids) + 1
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    expected = [position[token_id].logprob for token_id, position in zip(prompt_ids[1:], reference.prompt_logprobs[1:])]
    assert logprobs.token_logprobs[1:len(prompt_ids)] == pytest.approx(expected, abs=1e-4)
    # The generated token follows the prompt; greedy means it is its position's best.
    assert logprobs.token_logprobs[-1] == pytest.approx(max(logprobs.top_logprobs[-1].values()), abs=1e-6)
    assert logprobs.text_offset == sorted(logprobs.text_offset)

    scored_only = client.completions.create(
        model=MODEL_NAME, prompt=prompt_ids, max_tokens=0, temperature=0, echo=True, logprobs=0,
    )
    assert len(scored_only.choices[0].logprobs.token_logprobs) == len(prompt_ids)
    assert scored_only.choices[0].logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert scored_only.usage.completion_tokens == 0


def test_echo_of_text_prompt_prefixes_the_completion(client: openai.OpenAI, reference_llm: LLM) -> None:
    response = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=5, temperature=0, echo=True)
    [expected] = reference_texts(reference_llm, [PROMPTS[1]], SamplingParams(temperature=0.0, max_tokens=5))
    assert response.choices[0].text == PROMPTS[1] + expected


def test_chat_logprobs(client: openai.OpenAI, reference_llm: LLM) -> None:
    response = client.chat.completions.create(
        model=MODEL_NAME, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    [reference] = reference_llm.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
    assert len(content) == len(reference.outputs[0].token_ids)
    for entry, token_id, position in zip(content, reference.outputs[0].token_ids, reference.outputs[0].logprobs):
        assert entry.logprob == pytest.approx(position[token_id].logprob, abs=1e-4)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy picks the best


def test_models_and_health(client: openai.OpenAI, server: RunningServer) -> None:
    models = client.models.list()
    assert [model.id for model in models.data] == [MODEL_NAME]
    assert client.models.retrieve(MODEL_NAME).id == MODEL_NAME
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(f"{server.base_url}/health", timeout=10).status_code == 200


def test_lm_eval_loglikelihood_batch(server: RunningServer, reference_llm: LLM) -> None:
    """The exact payload lm-eval's `local-completions` sends for log-likelihood requests, parsed
    the way it parses it: sum of token_logprobs[ctxlen:-1] and a greedy check per choice."""
    contexts = [[1, 60, 61, 62], [1, 70, 71]]
    continuations = [[63, 64], [72]]
    body = {"model": MODEL_NAME, "prompt": [c + k for c, k in zip(contexts, continuations)],
            "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(f"{server.base_url}/v1/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60).json()
    choices = sorted(response["choices"], key=lambda choice: choice["index"])
    assert len(choices) == 2
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    for choice, context, continuation in zip(choices, contexts, continuations):
        token_logprobs = choice["logprobs"]["token_logprobs"][len(context):-1]
        top_logprobs = choice["logprobs"]["top_logprobs"][len(context):-1]
        [reference] = reference_llm.generate({"prompt_token_ids": context + continuation}, params)
        expected = [position[token_id].logprob
                    for token_id, position in zip(continuation, reference.prompt_logprobs[len(context):])]
        assert sum(token_logprobs) == pytest.approx(sum(expected), abs=1e-4)
        is_greedy = all(value == max(top.values()) for value, top in zip(token_logprobs, top_logprobs))
        expected_greedy = all(position[token_id].rank == 1
                              for token_id, position in zip(continuation, reference.prompt_logprobs[len(context):]))
        assert is_greedy == expected_greedy


def test_explicit_nulls_mean_defaults(server: RunningServer, reference_llm: LLM) -> None:
    """Some client libraries send null for every parameter the user did not set."""
    body = {"model": MODEL_NAME, "messages": MESSAGES, "max_tokens": 8, "temperature": 0, "n": None,
            "logprobs": None, "top_logprobs": None, "stop": None, "seed": None, "stream": None, "user": None}
    response = httpx.post(f"{server.base_url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
    assert response.status_code == 200, response.text
    [reference] = reference_llm.chat(MESSAGES, GREEDY)
    assert response.json()["choices"][0]["message"]["content"] == reference.outputs[0].text

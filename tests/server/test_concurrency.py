"""Many clients at once: batched outputs equal one-by-one outputs, and nothing leaks when
clients walk away mid-stream."""

from __future__ import annotations

import asyncio
import random

import httpx
import openai

from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

from .conftest import API_KEY, MODEL_NAME, RunningServer, run_async

WORDS = "the quick brown fox jumps over a lazy dog while models serve many users at once".split()


def varied_prompts(count: int, seed: int) -> list[str]:
    generator = random.Random(seed)
    return [" ".join(generator.choices(WORDS, k=generator.randint(2, 12))) for _ in range(count)]


def test_64_simultaneous_streams_equal_one_by_one(make_async_client, reference_llm: LLM, server: RunningServer) -> None:
    prompts = varied_prompts(64, seed=1)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    one_by_one = [reference_llm.generate(prompt, params)[0].outputs[0].text for prompt in prompts]

    async def stream_one(client: openai.AsyncOpenAI, prompt: str) -> tuple[str, str | None]:
        text, finish_reason = "", None
        async for chunk in await client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=8, temperature=0, stream=True
        ):
            text += chunk.choices[0].text
            finish_reason = chunk.choices[0].finish_reason or finish_reason
        return text, finish_reason

    async def all_at_once() -> list[tuple[str, str | None]]:
        limits = httpx.Limits(max_connections=100)
        async with make_async_client(http_client=httpx.AsyncClient(limits=limits, timeout=120)) as client:
            return await asyncio.gather(*(stream_one(client, prompt) for prompt in prompts))

    results = run_async(all_at_once())
    assert [text for text, _ in results] == one_by_one
    assert all(finish_reason in ("length", "stop") for _, finish_reason in results)
    assert server.wait_until_idle().num_free_blocks == server.stats().num_total_blocks


def test_clients_dropping_mid_stream_free_every_kv_block(make_async_client, server: RunningServer) -> None:
    """Hundreds of requests, a random share abandoned after a chunk or two (streaming) or by a
    client-side timeout (non-streaming); afterwards no KV block is held and the server answers."""
    prompts = varied_prompts(240, seed=2)
    chooser = random.Random(3)
    plans = [chooser.choice(["finish", "drop_stream", "drop_stream", "timeout"]) for _ in prompts]

    async def one_request(client: openai.AsyncOpenAI, prompt: str, plan: str, gate: asyncio.Semaphore) -> str:
        async with gate:
            if plan == "timeout":
                try:
                    await client.completions.create(
                        model=MODEL_NAME, prompt=prompt, max_tokens=64, temperature=0, timeout=0.05,
                        extra_body={"ignore_eos": True},
                    )
                except openai.APITimeoutError:
                    return "dropped"
                return "finished"
            stream = await client.completions.create(
                model=MODEL_NAME, prompt=prompt, max_tokens=24, temperature=0.7, stream=True,
                extra_body={"ignore_eos": True},
            )
            chunks_to_read = chooser.randint(1, 3) if plan == "drop_stream" else None
            received = 0
            async for _ in stream:
                received += 1
                if chunks_to_read is not None and received >= chunks_to_read:
                    await stream.close()  # the client hangs up mid-stream
                    return "dropped"
            return "finished"

    async def run_all() -> list[str]:
        gate = asyncio.Semaphore(32)
        async with make_async_client(http_client=httpx.AsyncClient(limits=httpx.Limits(max_connections=64))) as client:
            return await asyncio.gather(*(one_request(client, p, plan, gate) for p, plan in zip(prompts, plans)))

    aborted_before = server.metric("fitserve_request_finished_total", finish_reason="abort")
    outcomes = run_async(run_all())
    assert outcomes.count("dropped") > 50

    stats = server.wait_until_idle()
    assert (stats.num_running, stats.num_waiting) == (0, 0)
    assert stats.num_free_blocks == stats.num_total_blocks
    # The drops really cut requests short (rather than the requests finishing anyway).
    num_aborted = server.metric("fitserve_request_finished_total", finish_reason="abort") - aborted_before
    assert num_aborted > outcomes.count("dropped") // 2

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    response = client.completions.create(model=MODEL_NAME, prompt="still there?", max_tokens=3, temperature=0)
    assert response.choices[0].finish_reason in ("length", "stop")

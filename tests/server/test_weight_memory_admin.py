"""POST/GET /v1/admin/weight-memory on a BitStack model: resizing under load loses no request
and answers no 5xx, the outputs come back after shrink-then-grow, /metrics follows, and bad
budgets get a 400 with the valid range."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.bitstack_models import write_bitstack_checkpoint

from .conftest import API_KEY, MODEL_NAME, RunningServer, run_async, serve_in_thread

ADMIN = "/v1/admin/weight-memory"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def bitstack_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    model_dir = write_bitstack_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("bitstack"), num_blocks=4, rank=4)
    with serve_in_thread(model_dir) as running:
        yield running


def _get(server: RunningServer) -> dict:
    response = httpx.get(server.base_url + ADMIN, headers=AUTH, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def _post(server: RunningServer, budget: object) -> httpx.Response:
    return httpx.post(server.base_url + ADMIN, headers=AUTH, json={"bytes": budget}, timeout=120)


def _greedy(server: RunningServer, prompt: str) -> str:
    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)
    return client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_resizing_under_load_loses_no_request(bitstack_server: RunningServer) -> None:
    info = _get(bitstack_server)
    max_tokens = 200
    loop_times: dict[str, float] = {}

    async def scenario() -> tuple[list, list[int], list]:
        options = {"base_url": f"{bitstack_server.base_url}/v1", "api_key": API_KEY, "max_retries": 0, "timeout": 120}
        client = openai.AsyncOpenAI(**options)
        first_chunk = asyncio.Event()

        async def stream() -> tuple[str | None, int]:
            finish, usage = None, 0
            async for chunk in await client.completions.create(
                    model=MODEL_NAME, prompt="the quick brown fox", max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True}, extra_body={"ignore_eos": True}):
                first_chunk.set()
                if chunk.choices:
                    finish = chunk.choices[0].finish_reason or finish
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
            loop_times["stream_end"] = asyncio.get_running_loop().time()
            return finish, usage

        async def resize() -> list[int]:
            await first_chunk.wait()
            statuses = []
            async with httpx.AsyncClient(base_url=bitstack_server.base_url, headers=AUTH, timeout=120) as admin:
                for budget in (info["min_bytes"], f"{info['max_bytes']}B", (info["min_bytes"] + info["max_bytes"]) // 2):
                    statuses.append((await admin.post(ADMIN, json={"bytes": budget})).status_code)
            loop_times["resized"] = asyncio.get_running_loop().time()
            return statuses

        async def others() -> list:
            return await asyncio.gather(*(client.completions.create(
                model=MODEL_NAME, prompt=f"request {index}", max_tokens=16, temperature=0,
                extra_body={"ignore_eos": True}) for index in range(6)))

        streamed, statuses, answers = await asyncio.gather(stream(), resize(), others())
        return streamed, statuses, answers

    (finish, completion_tokens), statuses, answers = run_async(scenario())
    assert statuses == [200, 200, 200]
    assert loop_times["resized"] < loop_times["stream_end"]  # every switch happened mid-stream
    assert finish == "length" and completion_tokens == max_tokens
    assert all(answer.usage.completion_tokens == 16 for answer in answers)
    after = _get(bitstack_server)
    assert after["budget_bytes"] == (info["min_bytes"] + info["max_bytes"]) // 2
    assert info["min_bytes"] < after["current_bytes"] <= after["budget_bytes"]
    assert after["pending_budget_bytes"] is None
    assert bitstack_server.metric("fitserve_weight_memory_bytes") == after["current_bytes"]
    assert bitstack_server.metric("fitserve_weight_memory_budget_bytes") == after["budget_bytes"]
    assert bitstack_server.wait_until_idle().num_free_blocks == bitstack_server.stats().num_total_blocks


def test_shrink_then_grow_gives_the_same_answers(bitstack_server: RunningServer) -> None:
    info = _get(bitstack_server)
    assert _post(bitstack_server, info["max_bytes"]).status_code == 200
    before = _greedy(bitstack_server, "alpha beta gamma")
    shrunk = _post(bitstack_server, str(info["min_bytes"]))
    assert shrunk.status_code == 200 and shrunk.json()["current_bytes"] < info["max_bytes"]
    assert _greedy(bitstack_server, "alpha beta gamma") != before
    grown = _post(bitstack_server, info["max_bytes"])
    assert grown.status_code == 200 and grown.json()["current_bytes"] == info["max_bytes"]
    assert _greedy(bitstack_server, "alpha beta gamma") == before


def test_bad_budgets_get_400_with_the_valid_range(bitstack_server: RunningServer) -> None:
    info = _get(bitstack_server)
    for budget in (1, info["max_bytes"] + 1, "lots", True, None):
        response = _post(bitstack_server, budget)
        assert response.status_code == 400, (budget, response.text)
        assert response.json()["error"]["param"] == "bytes"
    message = _post(bitstack_server, 1).json()["error"]["message"]
    assert f"choose between {info['min_bytes'] / 2**20:.2f} MiB and {info['max_bytes'] / 2**20:.2f} MiB" in message
    not_json = httpx.post(bitstack_server.base_url + ADMIN, headers=AUTH, content=b"{", timeout=60)
    assert not_json.status_code == 400
    assert _get(bitstack_server)["current_bytes"] == info["current_bytes"]  # nothing changed


def test_the_admin_endpoint_needs_the_api_key(bitstack_server: RunningServer) -> None:
    assert httpx.get(bitstack_server.base_url + ADMIN, timeout=60).status_code == 401
    response = httpx.post(bitstack_server.base_url + ADMIN, json={"bytes": 1}, timeout=60,
                          headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


def test_a_dense_model_reports_its_weights_as_fixed(server: RunningServer) -> None:
    response = httpx.get(server.base_url + ADMIN, headers=AUTH, timeout=60)
    assert response.status_code == 400 and "only BitStack models" in response.json()["error"]["message"]
    assert httpx.post(server.base_url + ADMIN, headers=AUTH, json={"bytes": 10**6}, timeout=60).status_code == 400
    assert server.metric("fitserve_weight_memory_bytes") == 0  # no gauge for fixed weights

"""GET /metrics: Prometheus text whose counters follow the traffic."""

from __future__ import annotations

import httpx
import openai

from .conftest import MODEL_NAME, RunningServer

HISTOGRAM_COUNTS = (
    "fitserve_time_to_first_token_seconds_count",
    "fitserve_time_per_output_token_seconds_count",
    "fitserve_e2e_request_latency_seconds_count",
)


def test_metrics_counters_move_with_requests(client: openai.OpenAI, server: RunningServer) -> None:
    server.wait_until_idle()
    before = {
        "length": server.metric("fitserve_request_finished_total", finish_reason="length"),
        "prompt": server.metric("fitserve_prompt_tokens_total"),
        "generated": server.metric("fitserve_generation_tokens_total"),
        **{name: server.metric(name) for name in HISTOGRAM_COUNTS},
    }
    response = client.completions.create(
        model=MODEL_NAME, prompt=["metrics one", "metrics two"], max_tokens=5, temperature=0,
        extra_body={"ignore_eos": True},
    )
    streamed = list(client.completions.create(
        model=MODEL_NAME, prompt="metrics three", max_tokens=5, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    ))
    usage = streamed[-1].usage
    server.wait_until_idle()

    assert server.metric("fitserve_request_finished_total", finish_reason="length") - before["length"] == 3
    assert server.metric("fitserve_prompt_tokens_total") - before["prompt"] == (
        response.usage.prompt_tokens + usage.prompt_tokens
    )
    assert server.metric("fitserve_generation_tokens_total") - before["generated"] == 15
    for name in HISTOGRAM_COUNTS:
        assert server.metric(name) - before[name] == 3, name  # one observation per finished sequence


def test_metrics_expose_engine_gauges(server: RunningServer) -> None:
    response = httpx.get(f"{server.base_url}/metrics", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    server.wait_until_idle()
    assert server.metric("fitserve_num_requests_running") == 0
    assert server.metric("fitserve_num_requests_waiting") == 0
    assert server.metric("fitserve_kv_cache_usage_ratio") == 0
    assert server.metric("fitserve_kv_cache_total_blocks") == server.stats().num_total_blocks
    assert "fitserve_num_preemptions_total" in response.text

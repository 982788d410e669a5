"""The load client against a scripted SSE server: measured timings match the script."""

import asyncio
import json
import math
import statistics

import pytest

from fitserve.bench.client import ClientOptions, StreamClient, fetch_model_name
from fitserve.bench.load import run_load
from fitserve.bench.metrics import summarize
from fitserve.bench.workload import Conversation, Turn

TOLERANCE_S = 0.025  # scheduling noise on a busy 2-core machine


def script(**fields) -> str:
    return json.dumps(fields)


def conversations_from(scripts: list[str], output_tokens: int = 5) -> list[Conversation]:
    return [Conversation(index, [Turn(text, 3, output_tokens)]) for index, text in enumerate(scripts)]


def run(base_url: str, conversations, offsets=None, concurrency=None, endpoint="completions",
        timeout_s=10.0):
    async def go():
        client = StreamClient(ClientOptions(base_url=base_url, model=await fetch_model_name(base_url),
                                            endpoint=endpoint, request_timeout_s=timeout_s))
        # As the bench does: one request first, so connection setup and the client's lazy
        # initialisation are not charged to the first measured request.
        await client.warm_up(script(ttft_ms=1, tokens=1))
        try:
            return await run_load(conversations, offsets or [0.0] * len(conversations), client, concurrency)
        finally:
            await client.close()
    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_timings_match_the_scripted_delays(scripted_server, endpoint):
    base_url, app = scripted_server
    # Three answers with no scripted delay first: their TTFT is the loopback round trip of
    # this (busy) machine, which every scripted delay below sits on top of. One stream at a
    # time, so what is measured is the script, not the client's own queueing.
    load = run(base_url, conversations_from([script(ttft_ms=0, tokens=1)] * 3
                                            + [script(ttft_ms=150, itl_ms=40, tokens=5)] * 3),
               endpoint=endpoint, concurrency=1)
    round_trip_s = statistics.median(result.ttft_s for result in load.results[:3])
    assert round_trip_s < 0.1
    scripted = load.results[3:]
    summary = summarize(scripted, load.duration_s)
    assert summary["completed"] == 3 and summary["failed"] == 0
    for result in scripted:
        assert result.ttft_s - round_trip_s == pytest.approx(0.150, abs=TOLERANCE_S)
        assert result.e2e_s - round_trip_s == pytest.approx(0.150 + 4 * 0.040, abs=TOLERANCE_S)
        assert result.ttft_s >= 0.150  # never before the server sent it
        assert result.output_tokens == 5 and result.output_tokens_source == "usage"
        assert result.input_tokens == 7  # the server's usage.prompt_tokens wins over the estimate
    assert summary["tpot_ms"]["median"] == pytest.approx(40.0, abs=TOLERANCE_S * 1e3)
    assert summary["itl_ms"]["count"] == 12
    assert summary["itl_ms"]["median"] == pytest.approx(40.0, abs=TOLERANCE_S * 1e3)
    assert summary["e2e_ms"]["mean"] - round_trip_s * 1e3 == pytest.approx(310.0, abs=TOLERANCE_S * 1e3)
    body = app.stats()["bodies"][-1]
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    assert body["model"] == "scripted-model" and body["max_tokens"] == 5 and body["ignore_eos"] is True


def test_output_tokens_come_from_usage_or_else_from_chunks(scripted_server):
    base_url, _ = scripted_server
    load = run(base_url, conversations_from([
        script(ttft_ms=20, itl_ms=20, tokens=6, tokens_per_chunk=2),   # 3 chunks, usage says 6
        script(ttft_ms=20, itl_ms=20, tokens=4, usage=False),          # no usage: count chunks
    ]))
    with_usage, without_usage = load.results
    assert (with_usage.output_tokens, with_usage.output_tokens_source) == (6, "usage")
    assert len(with_usage.chunk_times_s) == 3
    # TPOT spreads the decode time over tokens, not chunks: 2 gaps of 20 ms over 5 tokens.
    summary = summarize([with_usage], load.duration_s)
    assert summary["tpot_ms"]["median"] == pytest.approx(40 / 5, abs=10)
    assert (without_usage.output_tokens, without_usage.output_tokens_source) == (4, "chunks")


def test_failures_and_timeouts_are_counted(scripted_server):
    base_url, _ = scripted_server
    load = run(base_url, conversations_from([
        script(ttft_ms=20, tokens=3),
        script(status=500),
        script(status=429),
        script(hang_s=5, tokens=3),                 # beyond the 0.6 s request timeout
        script(ttft_ms=20, tokens=5, error_after=2),
    ]), timeout_s=0.6)
    summary = summarize(load.results, load.duration_s)
    assert summary["completed"] == 1 and summary["failed"] == 4
    assert summary["failure_reasons"] == {"HTTP 500": 1, "HTTP 429": 1, "timeout": 1, "server error": 1}
    timed_out = load.results[3]
    assert timed_out.end_s == pytest.approx(0.6, abs=0.1)
    # Failed requests add no latency samples and no tokens to throughput.
    assert summary["ttft_ms"]["count"] == 1 and summary["total_output_tokens"] == 3


def test_open_loop_sends_on_schedule(scripted_server):
    base_url, _ = scripted_server
    offsets = [0.0, 0.1, 0.25, 0.4]
    load = run(base_url, conversations_from([script(ttft_ms=20, itl_ms=10, tokens=3)] * 4), offsets=offsets)
    lateness = []
    for result, offset in zip(load.results, offsets):
        assert result.scheduled_s == offset
        assert result.sent_s >= offset  # never early
        lateness.append(result.sent_s - offset)
    assert statistics.median(lateness) < TOLERANCE_S and max(lateness) < 2 * TOLERANCE_S


def test_closed_loop_keeps_exactly_the_asked_concurrency(scripted_server):
    base_url, app = scripted_server
    load = run(base_url, conversations_from([script(ttft_ms=80, itl_ms=10, tokens=3)] * 6),
               offsets=[0.0] * 6, concurrency=2)
    assert app.stats()["max_in_flight"] == 2
    by_send_time = sorted(load.results, key=lambda result: result.sent_s)
    # A closed loop: the third request starts the moment the first of the two before it ends.
    first_end = min(result.sent_s + result.end_s for result in by_send_time[:2])
    assert by_send_time[2].sent_s == pytest.approx(first_end, abs=TOLERANCE_S)
    assert by_send_time[2].sent_s >= first_end
    assert not math.isnan(summarize(load.results, load.duration_s)["request_throughput"])


def test_multi_turn_sends_history_with_received_answers(scripted_server):
    base_url, app = scripted_server
    turns = [Turn(script(ttft_ms=10, itl_ms=5, tokens=2), 3, 2), Turn(script(ttft_ms=10, tokens=1), 3, 1)]
    load = run(base_url, [Conversation(0, turns)], endpoint="chat")
    assert [r.turn_index for r in load.results] == [0, 1] and all(r.success for r in load.results)
    second_body = app.stats()["bodies"][2]
    assert [m["role"] for m in second_body["messages"]] == ["user", "assistant", "user"]
    assert second_body["messages"][1]["content"] == " tok tok"

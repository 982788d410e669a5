"""Driving the load: open loop (arrivals at a rate) and closed loop (N concurrent streams).

Both are one mechanism: each conversation becomes ready at its arrival offset and then waits
for one of `max_concurrency` slots. rate = inf with a concurrency cap C is a closed loop of C
streams (a new request starts the moment one finishes); a finite rate without a cap is a pure
open loop. TTFT counts from when the request was actually sent, so time spent waiting for a
slot is client-side queueing, kept visible as `sent_s − scheduled_s`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable

from fitserve.bench.client import StreamClient
from fitserve.bench.records import RequestResult
from fitserve.bench.workload import Conversation


@dataclass
class LoadResult:
    results: list[RequestResult]
    """Every request in request-id order."""
    duration_s: float
    """From the start of the load until the last response ended."""
    started_at_unix: float
    """Wall-clock start, to line the run up with hardware samples."""


async def run_load(conversations: list[Conversation], arrival_offsets_s: list[float],
                   client: StreamClient, max_concurrency: int | None = None,
                   on_request_done: Callable[[RequestResult], None] | None = None) -> LoadResult:
    """Send every conversation at its offset; turns within a conversation go one after another,
    each carrying the history (user turns and the answers actually received)."""
    if len(arrival_offsets_s) != len(conversations):
        raise ValueError("one arrival offset per conversation is needed")
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    first_request_ids = []
    next_id = 0
    for conversation in conversations:
        first_request_ids.append(next_id)
        next_id += len(conversation.turns)
    results: list[RequestResult | None] = [None] * next_id
    started_at_unix = time.time()
    run_start = time.perf_counter()

    async def run_conversation(conversation: Conversation, offset_s: float, first_id: int) -> None:
        delay = run_start + offset_s - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        if slots is not None:
            await slots.acquire()
        try:
            history: list[dict] = []
            for turn_index, turn in enumerate(conversation.turns):
                result = RequestResult(
                    request_id=first_id + turn_index, conversation_id=conversation.conversation_id,
                    turn_index=turn_index, scheduled_s=offset_s, sent_s=0.0,
                    input_tokens=turn.input_tokens, requested_output_tokens=turn.output_tokens,
                    client=conversation.client,
                )
                history.append({"role": "user", "content": turn.prompt})
                prompt = turn.prompt if len(conversation.turns) == 1 else list(history)
                await client.send(prompt, turn.output_tokens, result, run_start, user=conversation.client)
                results[result.request_id] = result
                if on_request_done is not None:
                    on_request_done(result)
                if not result.success:
                    # Later turns would ask about an answer that never came: count them failed.
                    for later_index in range(turn_index + 1, len(conversation.turns)):
                        later_turn = conversation.turns[later_index]
                        skipped = RequestResult(
                            request_id=first_id + later_index, conversation_id=conversation.conversation_id,
                            turn_index=later_index, scheduled_s=offset_s, sent_s=result.sent_s,
                            input_tokens=later_turn.input_tokens,
                            requested_output_tokens=later_turn.output_tokens, client=conversation.client,
                            error="skipped: an earlier turn of the conversation failed")
                        results[skipped.request_id] = skipped
                        if on_request_done is not None:
                            on_request_done(skipped)
                    break
                history.append({"role": "assistant", "content": result.output_text})
        finally:
            if slots is not None:
                slots.release()

    await asyncio.gather(*(
        run_conversation(conversation, offset, first_id)
        for conversation, offset, first_id in zip(conversations, arrival_offsets_s, first_request_ids)
    ))
    duration_s = time.perf_counter() - run_start
    return LoadResult([result for result in results if result is not None], duration_s, started_at_unix)

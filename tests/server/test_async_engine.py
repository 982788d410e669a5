"""AsyncLLMEngine on its own: one engine thread, asyncio streams, aborts and failures."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from fitserve.engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError, StreamGroup
from fitserve.engine.engine import LLMEngine, PromptTooLongError
from fitserve.llm import LLM
from fitserve.sampling_params import SamplingParams

from .conftest import engine_args_for, run_async

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def engine(tiny_model_dir: Path) -> Iterator[LLMEngine]:
    yield LLMEngine(engine_args_for(tiny_model_dir))


def run_with_engine(engine: LLMEngine, scenario) -> object:
    """Start an AsyncLLMEngine around `engine`, run `scenario(async_engine)`, always shut down."""

    async def main() -> object:
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        try:
            return await scenario(async_engine)
        finally:
            await async_engine.shutdown()

    return run_async(main())


async def wait_until_engine_idle(async_engine: AsyncLLMEngine) -> None:
    for _ in range(400):
        stats = async_engine.get_stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        await asyncio.sleep(0.025)


def test_generate_streams_cumulative_outputs_that_end_like_llm_generate(engine: LLMEngine, reference_llm: LLM) -> None:
    async def scenario(async_engine: AsyncLLMEngine) -> list:
        return [output async for output in async_engine.generate("The quick brown fox", GREEDY, "req-1")]

    outputs = run_with_engine(engine, scenario)
    texts = [output.outputs[0].text for output in outputs]
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    assert [output.finished for output in outputs] == [False] * (len(outputs) - 1) + [True]
    [reference] = reference_llm.generate("The quick brown fox", GREEDY)
    assert outputs[-1].outputs[0].token_ids == reference.outputs[0].token_ids


def test_concurrent_generates_share_the_engine(engine: LLMEngine, reference_llm: LLM) -> None:
    prompts = [f"prompt number {index}" for index in range(8)]

    async def scenario(async_engine: AsyncLLMEngine) -> list[str]:
        async def last_text(prompt: str, request_id: str) -> str:
            final = None
            async for output in async_engine.generate(prompt, GREEDY, request_id):
                final = output
            return final.outputs[0].text

        return await asyncio.gather(*(last_text(prompt, f"c-{index}") for index, prompt in enumerate(prompts)))

    assert run_with_engine(engine, scenario) == [output.outputs[0].text for output in reference_llm.generate(prompts, GREEDY)]


def test_add_errors_reach_the_caller(engine: LLMEngine) -> None:
    async def scenario(async_engine: AsyncLLMEngine) -> None:
        with pytest.raises(PromptTooLongError, match="maximum context length"):
            await async_engine.add_request("too-long", list(range(3, 300)), GREEDY)
        # Long enough that it cannot finish before the duplicate arrives, however loaded the machine.
        stream = await async_engine.add_request("dup", "hello", SamplingParams(max_tokens=200, ignore_eos=True))
        with pytest.raises(ValueError, match="already in use"):
            await async_engine.add_request("dup", "hello", GREEDY)
        # The refused duplicate did not disturb the request that owns the id.
        outputs = [output async for output in stream]
        assert outputs[-1].outputs[0].finish_reason == "length"
        assert len(outputs[-1].outputs[0].token_ids) == 200

    run_with_engine(engine, scenario)


def test_cancelled_consumer_aborts_and_frees_blocks(engine: LLMEngine) -> None:
    generated_before = engine.get_stats().num_generated_tokens_total

    async def scenario(async_engine: AsyncLLMEngine) -> tuple[int, int]:
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

        async def consume() -> None:
            async for _ in async_engine.generate("a long story " * 5, params, "cancel-me"):
                pass

        task = asyncio.create_task(consume())
        while async_engine.get_stats().num_running == 0:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        # Leaving the loop early (GeneratorExit) aborts too.
        generator = async_engine.generate("another story " * 5, params, "close-me")
        await anext(generator)
        await generator.aclose()

        await wait_until_engine_idle(async_engine)
        stats = async_engine.get_stats()
        return stats.num_free_blocks, stats.num_total_blocks

    num_free, num_total = run_with_engine(engine, scenario)
    assert num_free == num_total
    # Neither request ran to its 200 tokens.
    assert engine.get_stats().num_generated_tokens_total - generated_before < 400


def test_failing_step_fails_its_requests_but_not_the_loop(engine: LLMEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = engine.step
    calls = {"count": 0}

    def step_that_fails_once():
        calls["count"] += 1
        if calls["count"] == 2:
            raise RuntimeError("simulated kernel failure")
        return real_step()

    monkeypatch.setattr(engine, "step", step_that_fails_once)

    async def scenario(async_engine: AsyncLLMEngine) -> str:
        with pytest.raises(EngineStepError, match="simulated kernel failure"):
            async for _ in async_engine.generate("doomed", SamplingParams(max_tokens=20, ignore_eos=True), "doomed"):
                pass
        outputs = [output async for output in async_engine.generate("survivor", GREEDY, "survivor")]
        await wait_until_engine_idle(async_engine)
        return outputs[-1].outputs[0].finish_reason

    assert run_with_engine(engine, scenario) in ("length", "stop")
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_requests_after_shutdown_are_refused(engine: LLMEngine) -> None:
    async def main() -> None:
        async_engine = AsyncLLMEngine(engine)
        async_engine.start()
        await async_engine.shutdown()
        with pytest.raises(EngineDeadError):
            await async_engine.add_request("late", "hello", GREEDY)

    run_async(main())


def test_a_fan_out_group_does_not_hold_back_a_later_request(tiny_model_dir: Path) -> None:
    # Two running slots; one call adds 40 requests, then another client sends one. FCFS over
    # all 40 would finish the single request last; admission interleaves it near the front.
    engine = LLMEngine(dataclasses.replace(engine_args_for(tiny_model_dir), max_num_seqs=2))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)

    async def scenario(async_engine: AsyncLLMEngine) -> list[str]:
        finished: list[str] = []
        group = StreamGroup(async_engine)
        await group.add_all([(f"batch-{i}", "The quick brown fox", params) for i in range(40)])

        async def consume(outputs) -> None:
            async for output in outputs:
                if output.finished:
                    finished.append(output.request_id)

        single = async_engine.generate("Once upon a time", params, "single")
        await asyncio.gather(consume(group), consume(single))
        return finished

    finished = run_with_engine(engine, scenario)
    assert len(finished) == 41
    assert finished.index("single") < 8, finished
    batch = [request_id for request_id in finished if request_id != "single"]
    assert batch == [f"batch-{i}" for i in range(40)]  # the group keeps its own order


    async def abandon_a_group(async_engine: AsyncLLMEngine):
        group = StreamGroup(async_engine)
        # Long generations: none may finish while the stats are polled (on a loaded machine the
        # polling can lag the engine thread by many steps).
        long_params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        await group.add_all([(f"gone-{i}", "The quick brown fox", long_params) for i in range(40)])
        held = async_engine.get_stats()
        for _ in range(2000):  # the stats are published after the engine thread's next iteration
            if held.num_waiting + held.num_running == 40:
                break
            await asyncio.sleep(0.001)
            held = async_engine.get_stats()
        async for _ in group:
            break  # the client went away after the first output: leaving the loop aborts them all
        await wait_until_engine_idle(async_engine)
        return held, async_engine.get_stats()

    held, after = run_with_engine(engine, abandon_a_group)
    assert held.num_waiting + held.num_running == 40  # members not yet admitted count as waiting
    assert after.num_waiting == after.num_running == 0 and after.num_free_blocks == after.num_total_blocks

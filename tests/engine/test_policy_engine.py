"""Scheduling policies through the public API: `LLM(scheduling_policy=...)`, `priority`, clients.

A policy changes who runs when, never what a request generates: greedy outputs must equal
FCFS's, while the order of admission follows the policy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fitserve import LLM, SamplingParams
from fitserve.config import ConfigError, EngineArgs
from fitserve.engine.policy_vtc import VTCPolicy
from tests.tiny_models import random_token_ids, write_tiny_checkpoint

PROMPTS = [{"prompt_token_ids": random_token_ids(n, seed=n)} for n in (9, 17, 5, 12)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("policies") / "model", "llama3_rope_scaling")


def make_llm(model_dir: Path, **kwargs) -> LLM:
    options = dict(dtype="float32", kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=64) | kwargs
    return LLM(str(model_dir), **options)


def greedy(max_tokens: int = 10) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def test_priority_orders_admission_and_keeps_outputs(model_dir: Path) -> None:
    """One request at a time: they start in (priority, arrival) order, and each generates
    exactly what it generates under FCFS."""
    expected = [o.outputs[0].token_ids for o in make_llm(model_dir).generate(PROMPTS, greedy())]
    llm = make_llm(model_dir, scheduling_policy="priority", max_num_seqs=1)
    outputs = llm.generate(PROMPTS, greedy(), priority=[2, 0, 1, 0])
    assert [o.outputs[0].token_ids for o in outputs] == expected
    started = sorted(range(len(outputs)), key=lambda i: outputs[i].metrics.first_scheduled_time)
    assert started == [1, 3, 2, 0]


def test_vtc_charges_each_prompt_once_and_each_output_token(model_dir: Path) -> None:
    """In a cache small enough to preempt, a client's counter is its prompt tokens once (a
    recomputed prefill is not charged again) plus 2 per generated token."""
    llm = make_llm(model_dir, scheduling_policy="vtc", kv_cache_memory="48KiB", max_num_seqs=4)
    engine = llm.engine
    policy = engine.scheduler.policy
    assert isinstance(policy, VTCPolicy)
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(f"r{index}", prompt, greedy(40), client_id=f"client-{index}")
    finished = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert engine.get_stats().num_preemptions_total > 0, "the test needs a preemption to mean anything"
    for index, prompt in enumerate(PROMPTS):
        output = finished[f"r{index}"]
        assert len(output.outputs[0].token_ids) == 40
        assert policy.counters[f"client-{index}"] == len(prompt["prompt_token_ids"]) + 2 * 40
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks


def test_bad_priority_and_policy_are_refused(model_dir: Path) -> None:
    llm = make_llm(model_dir, scheduling_policy="priority")
    with pytest.raises(ValueError, match="priority must be an integer"):
        llm.engine.add_request("x", PROMPTS[0], greedy(), priority="high")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="got 1 priorities for 2 prompts"):
        llm.generate(PROMPTS[:2], greedy(), priority=[1])
    with pytest.raises(ConfigError, match="scheduling_policy must be fcfs, priority or vtc"):
        EngineArgs(scheduling_policy="lottery")
    with pytest.raises(ConfigError, match="weight of client 'a' must be a positive number"):
        EngineArgs(scheduling_policy="vtc", client_weights={"a": 0})

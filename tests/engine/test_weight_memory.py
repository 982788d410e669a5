"""Resizing a BitStack model inside a running engine: between steps, requests in flight keep
going, shrink-then-grow gives the same outputs, and no KV computed with other weights is
reused through the prefix cache."""

from __future__ import annotations

from pathlib import Path

import pytest

from fitserve import LLM, SamplingParams
from fitserve.config import ConfigError
from tests.bitstack_models import write_bitstack_checkpoint
from tests.tiny_models import random_token_ids, write_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
PROMPTS = [random_token_ids(40, seed) for seed in range(3)]


@pytest.fixture(scope="module")
def bitstack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dense = write_tiny_checkpoint(tmp_path_factory.mktemp("dense"), "llama2")
    return write_bitstack_checkpoint(dense, tmp_path_factory.mktemp("bitstack"), num_blocks=4, rank=4,
                                     perplexity_curve=[(1, 30.0), (10**9, 10.0)])


def _llm(model_dir: Path, **options) -> LLM:
    return LLM(str(model_dir), dtype="float32", device="cpu", kv_cache_memory="4MiB", **options)


def _greedy(llm: LLM, prompts: list[list[int]] = PROMPTS) -> list[list[int]]:
    return [output.outputs[0].token_ids for output in llm.generate(prompts, GREEDY)]


def test_shrink_then_grow_gives_identical_outputs(bitstack_dir: Path) -> None:
    llm = _llm(bitstack_dir)
    info = llm.weight_memory_info()
    assert info is not None and info.current_bytes == info.max_bytes
    before = _greedy(llm)
    small = llm.set_weight_memory(info.min_bytes)
    assert small.current_bytes == small.min_bytes and small.blocks_loaded < info.blocks_loaded
    assert _greedy(llm) != before
    assert llm.set_weight_memory(info.max_bytes) == info
    assert _greedy(llm) == before


def test_kv_cached_before_a_resize_is_not_reused_after_it(bitstack_dir: Path) -> None:
    llm = _llm(bitstack_dir)
    engine = llm.engine
    info = engine.weight_memory_info()
    prompt = PROMPTS[0]
    # A long request holds the prompt's blocks (registered in the prefix cache) across the resize.
    engine.add_request("long", prompt, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    for _ in range(3):
        engine.step()
    engine.add_request("twin", prompt, GREEDY)
    while "twin" not in {output.request_id for output in engine.step() if output.finished}:
        pass
    hits = engine.get_stats().num_prefix_cache_hit_tokens_total
    assert hits > 0  # the cache works within one set of weights...
    llm.set_weight_memory(info.min_bytes)
    engine.add_request("after", prompt, GREEDY)
    after = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.request_id == "after" and output.finished:
                after = output.outputs[0].token_ids
    assert engine.get_stats().num_prefix_cache_hit_tokens_total == hits  # ...not across them
    assert after == _greedy(_llm(bitstack_dir, weight_memory=info.min_bytes), [prompt])[0]


def test_a_resize_requested_mid_generation_switches_between_steps(bitstack_dir: Path) -> None:
    llm = _llm(bitstack_dir)
    engine = llm.engine
    info = engine.weight_memory_info()
    for index, prompt in enumerate(PROMPTS):
        engine.add_request(str(index), prompt, GREEDY)
    outputs = {}
    ticket = None
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs[output.request_id] = output
        steps += 1
        if steps == 3:
            ticket = engine.request_weight_memory(info.min_bytes)
            assert engine.weight_memory_info().pending_budget_bytes == info.min_bytes
            assert engine.get_stats().weight_memory_budget_bytes == info.min_bytes
    assert ticket is not None and ticket.done and ticket.error is None
    assert ticket.info.current_bytes == info.min_bytes
    assert engine.get_stats().weight_memory_bytes == info.min_bytes
    assert all(output.finished and len(output.outputs[0].token_ids) == GREEDY.max_tokens
               for output in outputs.values())
    assert len(outputs) == len(PROMPTS)


def test_a_newer_budget_supersedes_one_in_flight(bitstack_dir: Path) -> None:
    full = _llm(bitstack_dir).weight_memory_info()
    engine = _llm(bitstack_dir, weight_memory=full.min_bytes).engine
    first = engine.request_weight_memory((full.min_bytes + full.max_bytes) // 2)
    second = engine.request_weight_memory(full.max_bytes)
    engine.weight_resizer.wait()
    assert first.done and second.done and first.info == second.info
    assert second.info.current_bytes == full.max_bytes


def test_a_budget_out_of_range_at_start_names_the_range(bitstack_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"below the smallest loadable model.*choose between [0-9.]+ MiB and"):
        _llm(bitstack_dir, weight_memory="1KiB")


def test_the_banner_reports_the_loaded_share_and_expected_perplexity(bitstack_dir: Path) -> None:
    llm = _llm(bitstack_dir)
    info = llm.weight_memory_info()
    summary = llm.engine.weights_summary()
    assert f"{info.blocks_loaded}/{info.blocks_total} blocks" in summary
    assert "expected held-out perplexity" in summary and "bits/weight in projections" in summary


def test_weight_memory_is_fixed_for_other_formats(tmp_path: Path) -> None:
    llm = _llm(write_tiny_checkpoint(tmp_path, "llama2"))
    assert llm.weight_memory_info() is None and llm.engine.get_stats().weight_memory_bytes is None
    with pytest.raises(ConfigError, match="only change for a BitStack model"):
        llm.set_weight_memory("1MiB")


def test_a_budget_that_loads_the_same_blocks_keeps_the_prefix_cache(bitstack_dir: Path) -> None:
    llm = _llm(bitstack_dir)
    info = llm.weight_memory_info()
    _greedy(llm)
    hits = llm.engine.get_stats().num_prefix_cache_hit_tokens_total
    same = llm.set_weight_memory(info.max_bytes)
    assert same.blocks_loaded == info.blocks_loaded
    _greedy(llm)
    assert llm.engine.get_stats().num_prefix_cache_hit_tokens_total > hits

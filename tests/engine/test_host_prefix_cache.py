"""The prefix cache across both tiers: host memory (swap space) as a second level.

What must hold: a cached block the device overwrites is copied to the host first (once: a
hash the host holds is not copied again) and stays findable there under the same chained
hash; the host tier evicts its least recently used unowned blocks when it needs room; a new
request whose prefix continues in host memory gets those blocks copied in, not recomputed,
and reads exactly the K/V it would have computed (the model-free engine checks every
position; the real engine generates the same tokens as without a host tier); and no block
leaks in either tier, with aborts while a prefix is being copied in.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fitserve import LLM, SamplingParams
from fitserve.engine.kv_cache import KVCacheManager
from fitserve.engine.request import Request, RequestStatus
from fitserve.engine.scheduler import Scheduler
from tests.engine.test_scheduler import check_all_returned, make_request
from tests.engine.test_swap import SwappingFakeEngine, check_host_ownership, swap_scheduler
from tests.tiny_models import random_token_ids, write_tiny_checkpoint


def computed(manager: KVCacheManager, request: Request, num_tokens: int) -> None:
    """Pretend a step computed the request's first `num_tokens` tokens (the scheduler's job)."""
    assert manager.allocate(request, num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = num_tokens
    manager.cache_full_blocks(request)


def test_evicted_device_blocks_stay_findable_in_the_host_tier_which_evicts_lru() -> None:
    """Device 4 blocks, host 4 blocks (block size 4). A finished request's two full blocks are
    copied to the host when a filler overwrites them on the device, found there by the same
    hash chain, not copied again when evicted from the device a second time, and evicted
    from the host (oldest first) when two newer prefixes need the room."""
    manager = KVCacheManager(num_blocks=4, block_size=4, num_host_blocks=4)
    host_pool = manager.host_pool
    assert host_pool is not None and manager.host_prefix_cache

    def finish_and_evict(name: str, prompt: list[int]) -> list:
        request = make_request(name, prompt, 4, 0.0)
        computed(manager, request, len(prompt))
        manager.free(request)
        filler = make_request(f"{name}-filler", [99] * 16, 4, 0.0)
        assert manager.allocate(filler, 16)  # overwrites every device block
        offloads = manager.take_offloads()
        manager.free(filler)
        return offloads

    a = list(range(9))  # two full blocks and one partial (never cached)
    offloads = finish_and_evict("a", a)
    assert sum(count for _, _, count in offloads) == 2 and len(offloads) == 1  # one copy for the run
    assert manager.num_offloaded_blocks_total == 2
    second_turn = make_request("a2", a + [50, 51, 52], 4, 1.0)
    assert manager.find_cached_prefix(second_turn) == []
    found = manager.find_host_prefix(second_turn, [])
    assert found == [destination for _, first, count in offloads for destination in range(first, first + count)]
    assert host_pool.num_free_blocks == 4  # cached, not owned

    assert finish_and_evict("a-again", a) == []  # the host already holds both hashes
    assert manager.num_offloaded_blocks_total == 2 and host_pool.num_cached_blocks == 2

    finish_and_evict("b", list(range(20, 29)))
    finish_and_evict("c", list(range(40, 49)))
    assert manager.num_offloaded_blocks_total == 6 and host_pool.num_cached_blocks == 4
    assert manager.find_host_prefix(second_turn, []) == []  # the least recently used went
    assert len(manager.find_host_prefix(make_request("c2", list(range(40, 52)), 4, 2.0), [])) == 2
    assert len(manager.find_host_prefix(make_request("b2", list(range(20, 32)), 4, 2.0), [])) == 2


def test_a_swapped_requests_blocks_are_shared_not_copied_again_and_found_by_others() -> None:
    """A swap-out registers the full blocks it copies in the host tier (another request with
    that prefix finds them) and shares, without a copy, full blocks the host already holds."""
    manager = KVCacheManager(num_blocks=16, block_size=4, num_host_blocks=16)
    prompt = list(range(10))
    first = make_request("first", prompt, 4, 0.0)
    computed(manager, first, 10)
    groups = manager.swap_out(first)
    assert groups is not None and sum(count for _, _, count in groups) == 3
    assert len(manager.find_host_prefix(make_request("x", prompt + [7], 4, 1.0), [])) == 2

    second = make_request("second", prompt + [11, 12], 4, 1.0)  # same two full blocks, its own third
    computed(manager, second, 12)
    groups = manager.swap_out(second)
    assert groups is not None and sum(count for _, _, count in groups) == 1  # only the third block
    host_pool = manager.host_pool
    assert host_pool is not None and host_pool.num_free_blocks == 16 - 4
    manager.free_host(first)
    manager.free_host(second)
    assert host_pool.num_free_blocks == 16


def test_loaded_blocks_join_the_device_index_only_once_their_copy_is_done() -> None:
    """While a prefix is being copied in, its device blocks are being written: another request
    must not attach them. Once `finish_load` runs they are shared like any cached block, and
    the host blocks read from are unowned again (still cached)."""
    manager = KVCacheManager(num_blocks=4, block_size=4, num_host_blocks=8)
    prompt = list(range(12))
    first = make_request("first", prompt, 4, 0.0)
    computed(manager, first, 12)
    manager.free(first)
    filler = make_request("filler", [99] * 16, 4, 0.0)
    assert manager.allocate(filler, 16)
    manager.take_offloads()
    manager.free(filler)

    loading = make_request("loading", prompt + [1], 4, 1.0)
    host_blocks = manager.find_host_prefix(loading, [])
    assert len(host_blocks) == 3
    groups = manager.load_prefix(loading, [], host_blocks)
    assert groups is not None and sum(count for _, _, count in groups) == 3
    loading.num_computed_tokens = 12
    host_pool = manager.host_pool
    assert host_pool is not None and host_pool.num_free_blocks == 8 - 3  # read from: referenced
    other = make_request("other", prompt + [2], 4, 2.0)
    assert manager.find_cached_prefix(other) == []
    manager.finish_load(loading)
    assert manager.find_cached_prefix(other) == loading.block_ids[:3]
    assert host_pool.num_free_blocks == 8 and host_pool.num_cached_blocks == 3


class ConversationEngine(SwappingFakeEngine):
    """The swapping fake engine, also counting the tokens computed per request and checking,
    after every step, that each host block's references are exactly its owners'."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.computed_tokens: dict[str, int] = {}

    def step(self):  # type: ignore[override]
        record = super().step()
        for request_id, count in record.chunks:
            self.computed_tokens[request_id] = self.computed_tokens.get(request_id, 0) + count
        check_host_ownership(self.scheduler)
        return record


def conversation_run(num_blocks: int, num_host_blocks: int, seed: int,
                     abort_rate: float = 0.0) -> tuple[dict[str, list[int]], ConversationEngine]:
    """Five conversations: first turns, then fillers that push them off the device, then
    second turns (first turn's prompt + output + 5 new tokens). Returns the second turns'
    outputs."""
    rng = random.Random(seed)
    scheduler = swap_scheduler(num_blocks, num_host_blocks, budget=16)
    engine = ConversationEngine(scheduler)
    first_turns = [make_request(f"t1-{i}", random_token_ids(10 + 3 * i, seed=seed * 10 + i, vocab_size=90), 6,
                                float(i)) for i in range(5)]
    for request in first_turns:
        engine.add(request)
    engine.run(max_steps=500)
    fillers = [make_request(f"f{i}", random_token_ids(12, seed=1000 + seed * 10 + i, vocab_size=90), 4,
                            10.0 + i) for i in range(4)]
    for request in fillers:
        engine.add(request)
    engine.run(max_steps=500)
    second_turns = [make_request(f"t2-{i}", first.all_token_ids + random_token_ids(5, seed=2000 + i, vocab_size=90),
                                 6, 20.0 + i) for i, first in enumerate(first_turns)]
    for request in second_turns:
        engine.add(request)
    for _ in range(500):
        if not scheduler.has_unfinished_requests():
            break
        loading = [r for r in scheduler.swapping_in if r.status == RequestStatus.SWAPPING_IN]
        if loading and rng.random() < abort_rate:
            victim = rng.choice(loading)
            engine.in_flight = [(r, g) for r, g in engine.in_flight if r is not victim]
            engine.abort(victim)
        engine.step()
    check_all_returned(scheduler)
    return {r.request_id: r.output_token_ids for r in second_turns if r.status != RequestStatus.FINISHED_ABORTED}, engine


def test_second_turns_load_their_history_from_the_host_tier_instead_of_recomputing() -> None:
    """Device blocks too few to keep five conversations' first turns cached past the fillers:
    the second turns find their history in host memory, copy it in and compute only the rest;
    every position they read holds the right K/V (the fake engine checks), and their outputs
    equal those of a device big enough to need no host tier."""
    expected, roomy = conversation_run(num_blocks=256, num_host_blocks=64, seed=1)
    assert roomy.scheduler.kv_cache.num_host_hit_tokens_total == 0
    outputs, engine = conversation_run(num_blocks=12, num_host_blocks=64, seed=1)
    assert outputs == expected
    kv_cache = engine.scheduler.kv_cache
    assert kv_cache.num_offloaded_blocks_total > 0
    assert kv_cache.num_host_hit_tokens_total >= 5 * 2 * kv_cache.block_size  # each reuses >= 2 blocks
    for index in range(5):
        request_id = f"t2-{index}"
        history = 10 + 3 * index + 6
        assert engine.computed_tokens[request_id] < history  # not recomputed from the start
    assert sum(engine.computed_tokens[f"t2-{i}"] for i in range(5)) < sum(
        roomy.computed_tokens[f"t2-{i}"] for i in range(5)) + kv_cache.num_host_hit_tokens_total


def test_a_small_host_tier_evicts_lru_and_still_serves_correct_kv() -> None:
    """Host memory smaller than what the conversations offload: the host tier evicts as it
    goes (least recently used first, so the fillers' newer blocks push the first turns out),
    fewer second turns hit it the smaller it is, and every read is still the right K/V with
    unchanged outputs."""
    expected, _ = conversation_run(num_blocks=256, num_host_blocks=64, seed=1)
    hits = []
    for num_host_blocks in (10, 24, 64):
        outputs, engine = conversation_run(num_blocks=12, num_host_blocks=num_host_blocks, seed=1)
        assert outputs == expected
        kv_cache = engine.scheduler.kv_cache
        assert kv_cache.host_pool is not None and kv_cache.host_pool.num_cached_blocks <= num_host_blocks
        if num_host_blocks < 64:
            assert kv_cache.num_offloaded_blocks_total > num_host_blocks  # some were evicted again
        hits.append(kv_cache.num_host_hit_tokens_total)
    assert hits[0] < hits[1] < hits[2]


@pytest.mark.parametrize("seed", [2, 3, 4])
def test_aborts_while_a_prefix_is_copied_in_leak_nothing(seed: int) -> None:
    """Aborting second turns while their host prefix is being copied in returns every block
    in both tiers (check_all_returned, and host references match owners after every step)."""
    outputs, engine = conversation_run(num_blocks=12, num_host_blocks=24, seed=seed, abort_rate=0.5)
    assert len(outputs) < 5  # some were aborted mid-load
    assert engine.scheduler.kv_cache.num_host_hit_tokens_total > 0


# ----------------------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("host-prefix") / "model", "llama3_rope_scaling")


def test_engine_second_turn_copies_its_history_in_and_generates_the_same_tokens(model_dir: Path) -> None:
    """Real engine, greedy: after fillers evict the first turn's blocks from the device, the
    second turn (first prompt + output + new tokens) copies the history's full blocks in from
    host memory, computes only the tokens after them, and generates exactly what it generates
    with no host tier (recompute mode, same KV cache). An abort during such a copy leaks nothing."""
    options = dict(dtype="float32", block_size=8, max_num_batched_tokens=64, max_num_seqs=4,
                   kv_cache_memory="64KiB")
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    first_prompt = random_token_ids(40, seed=5)
    fillers = [{"prompt_token_ids": random_token_ids(48, seed=100 + i)} for i in range(4)]

    def conversation(llm: LLM) -> tuple[list[int], list[int], dict[str, int]]:
        first = llm.generate([{"prompt_token_ids": first_prompt}], params)[0].outputs[0].token_ids
        llm.generate(fillers, params)
        second_prompt = first_prompt + first + random_token_ids(10, seed=6)
        scheduled: dict[str, int] = {}
        execute = llm.engine.runner.execute

        def counting_execute(scheduler_output):
            for item in scheduler_output.scheduled:
                scheduled[item.request.request_id] = scheduled.get(item.request.request_id, 0) + item.num_new_tokens
            return execute(scheduler_output)

        llm.engine.runner.execute = counting_execute  # type: ignore[method-assign]
        second = llm.generate([{"prompt_token_ids": second_prompt}], params)[0].outputs[0].token_ids
        llm.engine.runner.execute = execute  # type: ignore[method-assign]
        return first, second, scheduled

    reference = LLM(str(model_dir), preemption_mode="recompute", **options)
    expected_first, expected_second, reference_scheduled = conversation(reference)
    llm = LLM(str(model_dir), preemption_mode="swap", swap_space="1MiB", **options)
    engine = llm.engine
    first, second, scheduled = conversation(llm)
    assert (first, second) == (expected_first, expected_second)

    second_length = 40 + 16 + 10
    decodes = 16 - 1  # one token per step after the one the prompt's last step samples
    assert list(reference_scheduled.values()) == [second_length + decodes]  # all recomputed
    history_blocks = (40 + 16 - 1) // 8  # the first turn's last token was sampled, never computed
    stats = engine.get_stats()
    assert stats.num_host_prefix_hit_tokens_total == history_blocks * 8
    assert list(scheduled.values()) == [second_length - history_blocks * 8 + decodes]
    swap_space = engine.swap_space
    assert swap_space is not None and stats.num_swap_ins_total == 0  # every copy in was the history's
    assert swap_space.num_bytes_in == history_blocks * swap_space.bytes_per_block

    # The same second turn again, aborted while its history is being copied in.
    llm.generate(fillers, params)
    engine.add_request("aborted", {"prompt_token_ids": first_prompt + first + [3, 4, 5]}, params)
    engine.step()
    assert engine.scheduler.swapping_in and engine.scheduler.swapping_in[0].request_id == "aborted"
    engine.abort_request("aborted")
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.kv_cache.num_free_blocks == engine.kv_cache.num_blocks
    host_pool = engine.kv_cache.host_pool
    assert host_pool is not None and host_pool.num_free_blocks == host_pool.num_blocks
    assert host_pool.num_cached_blocks > 0


def test_a_weights_change_hides_both_tiers_cached_prefixes_but_new_ones_round_trip() -> None:
    """After the model's weights change (an elastic-weights resize), KV computed before is no hit
    in either tier; blocks computed afterwards are found on the device and, once evicted there,
    in the host tier under the same salted hash."""
    manager = KVCacheManager(num_blocks=4, block_size=4, num_host_blocks=4)
    prompt = list(range(9))

    def finish_and_evict(name: str) -> None:
        request = make_request(name, prompt, 4, 0.0)
        computed(manager, request, len(prompt))
        manager.free(request)
        filler = make_request(f"{name}-filler", [99] * 16, 4, 0.0)
        assert manager.allocate(filler, 16)
        manager.take_offloads()
        manager.free(filler)

    finish_and_evict("before")
    assert len(manager.find_host_prefix(make_request("probe", prompt + [1], 4, 1.0), [])) == 2
    manager.new_weights_epoch()
    after = make_request("after", prompt + [1], 4, 2.0)
    assert manager.find_cached_prefix(after) == [] and manager.find_host_prefix(after, []) == []

    fresh = make_request("fresh", prompt, 4, 3.0)
    computed(manager, fresh, len(prompt))
    manager.free(fresh)
    assert len(manager.find_cached_prefix(make_request("hit", prompt + [1], 4, 4.0))) == 2
    finish_and_evict("again")
    assert len(manager.find_host_prefix(make_request("host-hit", prompt + [1], 4, 5.0), [])) == 2

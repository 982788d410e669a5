"""Swap preemption (FastSwitch): KV moved to host memory and back instead of recomputed.

What must hold: a swapped-out request resumes with exactly the KV it had (the model-free
engine loop checks every position it reads, and the real engine generates the same tokens
as without preemption, greedy and seeded); copies move groups of consecutive blocks, not
single blocks; the host copy is kept, so a second swap-out with no new tokens copies
nothing; and no block leaks in either tier, aborts included.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from fitserve import LLM, SamplingParams
from fitserve.config import ConfigError, EngineArgs
from fitserve.engine.kv_cache import KVCacheManager
from fitserve.engine.policy import make_policy
from fitserve.engine.request import Request, RequestStatus
from fitserve.engine.scheduler import Scheduler
from fitserve.quant.quantize import quantize_model
from tests.engine.test_scheduler import FakeEngine, StepRecord, check_all_returned, make_request
from tests.tiny_models import random_token_ids, write_tiny_checkpoint


class SwappingFakeEngine(FakeEngine):
    """FakeEngine whose simulated KV contents also live in a host tier: swap-outs copy the
    block contents before the step computes, swap-ins land one step later (as an
    asynchronous copy would), and every read is still checked against the true prefix."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__(scheduler)
        self.host_kv: dict[int, dict[int, tuple[int, ...]]] = {}
        self.in_flight: list[tuple[Request, list[tuple[int, int, int]]]] = []
        self.copies = 0

    def step(self) -> StepRecord:
        for request, groups in self.in_flight:
            for host_start, device_start, count in groups:
                for offset in range(count):
                    self.kv[device_start + offset] = dict(self.host_kv.get(host_start + offset, {}))
                self.copies += 1
        self.scheduler.finish_swap_in([request.request_id for request, _ in self.in_flight])
        self.in_flight = []
        original_schedule = self.scheduler.schedule

        def schedule_and_copy_out():
            output = original_schedule()
            for groups in [output.offload] + [groups for _, groups in output.swap_out]:
                for device_start, host_start, count in groups:
                    for offset in range(count):
                        self.host_kv[host_start + offset] = dict(self.kv.get(device_start + offset, {}))
                    self.copies += 1
            self.in_flight = list(output.swap_in)
            return output

        self.scheduler.schedule = schedule_and_copy_out  # type: ignore[method-assign]
        try:
            return super().step()
        finally:
            self.scheduler.schedule = original_schedule  # type: ignore[method-assign]


def swap_scheduler(num_blocks: int, num_host_blocks: int = 64, **kwargs) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 4, enable_prefix_caching=kwargs.pop("prefix", True),
                                    num_host_blocks=num_host_blocks),
                     max_num_batched_tokens=kwargs.pop("budget", 32), max_num_seqs=kwargs.pop("max_num_seqs", 4),
                     policy=kwargs.pop("policy", None), preemption_mode="swap")


def test_swapped_requests_resume_with_their_kv_and_keep_progress() -> None:
    """In a pool too small for everyone, requests are swapped out and back in, never
    recomputed: every position they read after resuming holds the right prefix's KV (the
    fake engine checks), their outputs equal those of an unconstrained run, and nothing leaks."""
    prompts = [random_token_ids(6 + 3 * i, seed=i, vocab_size=90) for i in range(5)]

    def run(num_blocks: int) -> tuple[list[list[int]], Scheduler, SwappingFakeEngine]:
        scheduler = swap_scheduler(num_blocks)
        engine = SwappingFakeEngine(scheduler)
        requests = [make_request(f"r{i}", p, max_tokens=14, arrival_time=i) for i, p in enumerate(prompts)]
        for request in requests:
            engine.add(request)
        computed_after_swap_in = []
        for _ in range(500):
            if not scheduler.has_unfinished_requests():
                break
            engine.step()
            computed_after_swap_in += [r.num_computed_tokens for r in scheduler.swapping_in]
        check_all_returned(scheduler)
        assert all(n > 0 for n in computed_after_swap_in)
        return [r.output_token_ids for r in requests], scheduler, engine

    expected, roomy, _ = run(num_blocks=64)
    assert roomy.num_swap_outs_total == 0
    outputs, tight, engine = run(num_blocks=12)
    assert outputs == expected
    assert tight.num_swap_outs_total > 2 and tight.num_swap_ins_total == tight.num_swap_outs_total
    assert engine.copies > 0


def run_tight(mode: str, prefix: bool) -> Scheduler:
    """Five requests through a 12-block pool under `mode`; returns the finished scheduler
    after checking that every token was computed once plus the recomputed ones, exactly."""
    scheduler = swap_scheduler(12, prefix=prefix)
    scheduler.preemption_mode = mode
    engine = SwappingFakeEngine(scheduler)
    requests = [make_request(f"r{i}", random_token_ids(10 + 3 * i, seed=i, vocab_size=90), max_tokens=14,
                             arrival_time=i) for i in range(5)]
    for request in requests:
        engine.add(request)
    while scheduler.has_unfinished_requests():
        engine.step()
    check_all_returned(scheduler)
    assert scheduler.num_preemptions_total > 0
    once = sum(request.num_tokens - 1 for request in requests)  # the last token is never fed back
    assert scheduler.num_computed_tokens_total == once + scheduler.num_recomputed_tokens_total
    return scheduler


def test_recomputed_tokens_are_counted_and_swap_recomputes_none() -> None:
    """Swap recomputes nothing. Recompute without the prefix cache computes every dropped
    position again; with it, a preempted request reattaches its own blocks that the cache
    still holds (freed, not yet overwritten), so it recomputes less."""
    assert run_tight("swap", prefix=True).num_recomputed_tokens_total == 0
    without_cache = run_tight("recompute", prefix=False).num_recomputed_tokens_total
    with_cache = run_tight("recompute", prefix=True).num_recomputed_tokens_total
    assert 0 < with_cache < without_cache


def test_the_victim_is_the_latest_arrival_even_when_it_was_scheduled_first() -> None:
    """A request swapped back in joins the running list after a newer one admitted in the same
    step, so the newer one is visited first and gets its block. When the older one then finds
    the pool empty, FCFS still gives up the newer one: it is taken out of the step again and
    swapped out, and the older one runs with its block. (Sparing scheduled requests swapped
    the older one out again and again, while the newer one ran.)"""
    scheduler = swap_scheduler(num_blocks=4, max_num_seqs=4)
    older = make_request("older", list(range(8)), 8, arrival_time=0.0)
    newer = make_request("newer", list(range(10, 17)), 8, arrival_time=1.0)
    for request in (newer, older):  # the running list's order after a swap-in rejoined
        assert scheduler.kv_cache.allocate(request, request.num_tokens)
        request.num_computed_tokens = request.num_tokens
        request.output_token_ids.append(5)
        request.status = RequestStatus.RUNNING
        scheduler.running.append(request)
    assert scheduler.kv_cache.num_free_blocks == 0  # newer's token fits its block, older's does not

    output = scheduler.schedule()

    assert output.preempted == [newer] and newer.status == RequestStatus.SWAPPED
    assert [(item.request, item.num_new_tokens) for item in output.scheduled] == [(older, 1)]
    assert scheduler.running == [older] and len(older.block_ids) == 3
    assert [request for request, _ in output.swap_out] == [newer]


def test_swap_moves_groups_and_a_second_swap_out_without_new_tokens_moves_nothing() -> None:
    """A request whose 5 blocks were allocated together is one group: one copy each way. The
    host copy survives the swap-in, so swapping out again without new tokens copies nothing,
    and after one more token only the last block is copied."""
    manager = KVCacheManager(num_blocks=32, block_size=4, num_host_blocks=32)
    manager.allocate(make_request("other", [1, 2, 3], 4, 0.0), 3)  # block 0 taken: ids need not start at 0
    request = make_request("r", list(range(20)), 4, 1.0)
    assert manager.allocate(request, 20)
    request.num_computed_tokens = 20
    device_blocks = list(request.block_ids)
    assert device_blocks == list(range(device_blocks[0], device_blocks[0] + 5))

    out = manager.swap_out(request)
    assert out is not None and len(out) == 1 and out[0][2] == 5
    assert request.block_ids == [] and manager.num_free_blocks == 31
    back = manager.swap_in(request)
    assert back is not None and len(back) == 1 and back[0][2] == 5
    assert manager.swap_out(request) == []  # no new tokens: zero copies, zero bytes
    assert manager.swap_in(request) is not None
    request.output_token_ids.append(7)
    assert manager.allocate(request, 1)
    request.num_computed_tokens = 21
    again = manager.swap_out(request)
    assert again is not None and sum(count for _, _, count in again) == 1  # only the new sixth block
    manager.free_host(request)
    assert manager.host_pool is not None and manager.host_pool.num_free_blocks == 32


def test_swap_in_shares_the_blocks_the_device_still_caches() -> None:
    """A request swapped out and back before its freed blocks were overwritten copies back
    only the block that was never cached (the partial last one): its full blocks are still
    in the device's prefix cache and are attached instead."""
    manager = KVCacheManager(num_blocks=32, block_size=4, num_host_blocks=32)
    request = make_request("r", list(range(18)), 4, 0.0)
    assert manager.allocate(request, 18)
    request.num_computed_tokens = 18
    manager.cache_full_blocks(request)
    device_blocks = list(request.block_ids)
    out = manager.swap_out(request)
    assert out is not None and sum(count for _, _, count in out) == 5
    back = manager.swap_in(request)
    assert back is not None and sum(count for _, _, count in back) == 1
    assert request.block_ids[:4] == device_blocks[:4]
    assert manager.num_free_blocks == 32 - 5


def test_swap_out_falls_back_to_recompute_when_host_memory_is_full() -> None:
    """A victim that does not fit in host memory is recomputed instead, and still finishes."""
    scheduler = swap_scheduler(num_blocks=10, num_host_blocks=2)
    engine = SwappingFakeEngine(scheduler)
    requests = [make_request(f"r{i}", random_token_ids(12, seed=i, vocab_size=90), 12, float(i)) for i in range(3)]
    for request in requests:
        engine.add(request)
    engine.run(max_steps=400)
    assert scheduler.num_preemptions_total > scheduler.num_swap_outs_total
    assert all(r.num_output_tokens == 12 for r in requests)
    check_all_returned(scheduler)


def check_host_ownership(scheduler: Scheduler) -> None:
    """Every host block's references are exactly its owners': swapped-out requests' host
    copies and the prefix loads still copying from it; the free ones are the unreferenced."""
    kv_cache = scheduler.kv_cache
    host_pool = kv_cache.host_pool
    assert host_pool is not None
    references = [0] * host_pool.num_blocks
    for host in kv_cache._host.values():
        for block_id in host.block_ids:
            references[block_id] += 1
    for block_ids in kv_cache._loading.values():
        for block_id in block_ids:
            references[block_id] += 1
    assert [block.ref_count for block in host_pool.blocks] == references
    assert host_pool.num_free_blocks == references.count(0)


@pytest.mark.parametrize("policy_name", ["fcfs", "vtc"])
def test_aborts_while_swapped_or_swapping_in_leak_nothing(policy_name: str) -> None:
    """Random aborts hit requests that are running, swapped out or being swapped in (their own
    KV, or a next turn's prefix from the host tier): both tiers get every block back, and host
    references match their owners after every step."""
    rng = random.Random(7)
    scheduler = swap_scheduler(num_blocks=14, num_host_blocks=24, policy=make_policy(policy_name), max_num_seqs=5)
    engine = SwappingFakeEngine(scheduler)
    live: list[Request] = []
    earlier: list[Request] = []
    hit = set()
    for index in range(150):
        if index < 90 and rng.random() < 0.6:
            prompt = random_token_ids(rng.randint(2, 18), seed=index, vocab_size=90)
            if earlier and rng.random() < 0.4:  # a next turn: an earlier request's tokens come first
                prompt = rng.choice(earlier).all_token_ids + prompt
            request = make_request(f"r{index}", prompt[:40], rng.randint(2, 20), float(index))
            earlier.append(request)
            request.client_id = rng.choice("ab")
            engine.add(request)
            live.append(request)
        if live and rng.random() < 0.2:
            swapped = [r for r in live if r.status in (RequestStatus.SWAPPED, RequestStatus.SWAPPING_IN)]
            victim = rng.choice(swapped) if swapped and rng.random() < 0.7 else rng.choice(live)
            live.remove(victim)
            if not victim.is_finished:
                hit.add(victim.status)
                engine.in_flight = [(r, g) for r, g in engine.in_flight if r is not victim]
                engine.abort(victim)
        if scheduler.has_unfinished_requests():
            engine.step()
            check_host_ownership(scheduler)
        live = [r for r in live if not r.is_finished]
    engine.run(max_steps=3000)
    assert scheduler.num_swap_outs_total > 3
    assert scheduler.kv_cache.num_host_hit_tokens_total > 0  # next turns loaded from the host tier
    assert RequestStatus.SWAPPED in hit and RequestStatus.RUNNING in hit
    check_all_returned(scheduler)


# ----------------------------------------------------------------------------- the real engine


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("swap") / "model", "llama3_rope_scaling")


GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)


def assert_swap_changes_no_token(model: Path, kv_cache_memory: str, params: SamplingParams = GREEDY,
                                 **options: Any) -> LLM:
    """Requests on a KV cache of `kv_cache_memory` with swap preemption generate what they
    generate with room to spare; swaps happened, every swap-out came back, and the device and
    host tiers end empty. Returns the swapping LLM for further checks."""
    prompts = [{"prompt_token_ids": random_token_ids(8 + 5 * i, seed=i)} for i in range(6)]
    options = dict(block_size=8, max_num_batched_tokens=64, max_num_seqs=6) | options
    expected = [o.outputs[0].token_ids for o in LLM(str(model), kv_cache_memory="4MiB", **options)
                .generate(prompts, params)]
    llm = LLM(str(model), kv_cache_memory=kv_cache_memory, preemption_mode="swap", swap_space="4MiB", **options)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == expected
    stats = llm.engine.get_stats()
    assert stats.num_swap_outs_total > 0 and stats.num_swap_ins_total == stats.num_swap_outs_total
    kv_cache = llm.engine.kv_cache
    assert kv_cache.num_free_blocks == kv_cache.num_blocks
    assert kv_cache.host_pool is not None and kv_cache.host_pool.num_free_blocks == kv_cache.host_pool.num_blocks
    return llm


@pytest.mark.parametrize("seeded", [False, True])
def test_engine_swap_generates_exactly_the_unpreempted_tokens(model_dir: Path, seeded: bool) -> None:
    """With a KV cache too small for all requests at once, swap preemption happens and every
    request still generates token for token what it generates with room to spare (greedy,
    and seeded sampling); the copies are groups and both tiers end empty."""
    params = (SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=40, ignore_eos=True) if seeded
              else GREEDY)
    engine = assert_swap_changes_no_token(model_dir, "64KiB", params, dtype="float32").engine
    stats = engine.get_stats()
    assert stats.num_swap_bytes_total > 0
    assert engine.swap_space is not None
    copied_blocks = stats.num_swap_bytes_total // engine.swap_space.bytes_per_block
    assert engine.swap_space.num_copies < copied_blocks  # groups, not one copy per block


def test_swap_on_a_w4_model_in_bfloat16_generates_the_unpreempted_tokens(model_dir: Path, tmp_path: Path) -> None:
    """The configuration swap preemption pays off most in: a 4-bit model with bf16 activations,
    decoded by the integer kernels in the fused decode stack."""
    quantized = tmp_path / "w4"
    quantize_model(model_dir, quantized, "w4", group_size=32, progress=False)
    assert_swap_changes_no_token(quantized, "32KiB", dtype="bfloat16")


def test_swap_settings_are_checked(model_dir: Path) -> None:
    with pytest.raises(ConfigError, match="preemption_mode must be recompute or swap"):
        EngineArgs(preemption_mode="drop")
    with pytest.raises(ConfigError, match="smaller than one KV block"):
        LLM(str(model_dir), dtype="float32", preemption_mode="swap", swap_space="1KiB", kv_cache_memory="1MiB")


def test_swap_moves_an_int8_cache_with_its_scales(model_dir: Path) -> None:
    """An int8 KV cache swaps its values and their per-token scales: requests swapped out and
    back generate what they generate unpreempted over the same int8 cache."""
    assert_swap_changes_no_token(model_dir, "40KiB", dtype="float32", kv_cache_dtype="int8")

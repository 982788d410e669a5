"""The static-buffer decode path that CUDA graphs replay gives the ordinary path's tokens.

A captured graph needs a GPU, but everything around it does not: padding a batch up to the
next graph size, the spare KV block that padding rows write into, the static buffers that
each step overwrites, the metadata views. `DecodeGraphs(use_cuda_graphs=False)` runs exactly
that code eagerly, so these tests check it on the CPU against the ordinary runner.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve import LLM, SamplingParams
from fitserve.engine.decode_graphs import DecodeGraphs, graph_batch_sizes
from fitserve.engine.runner import allocate_kv_cache
from tests.tiny_models import random_token_ids, write_tiny_checkpoint

PROMPT_LENGTHS = (3, 9, 17, 30, 41)  # five sequences: padded to a graph of 8
MAX_TOKENS = (12, 5, 9, 14, 3)      # finishing at different steps: 5, 4, 3, 2, 1 running


def test_graph_batch_sizes_cover_every_batch_up_to_the_limit() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]
    assert graph_batch_sizes(36) == [1, 2, 4, 8, 16, 24, 32, 36]


def _llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8, max_num_seqs=8)


def install_static_decode(llm: LLM, max_seq_len: int | None = None,
                          longest_contexts: list[int] | None = None, bounded_grids: bool = False) -> list[int]:
    """Route the engine's decode steps through DecodeGraphs (eager), with a spare block for
    padding filled with NaN so that any read of it by a real sequence would show. Returns a
    list that records the padded batch size of every step it ran (and, if given,
    `longest_contexts` the longest context of each). With `bounded_grids` the kernels are
    launched on the grids a captured graph would use."""
    engine = llm.engine
    config = engine.model_config
    kv_caches = allocate_kv_cache(
        config.num_hidden_layers, engine.num_kv_blocks + 1, engine.block_size,
        config.num_key_value_heads, config.head_dim, engine.dtype, engine.device, engine.args.kv_cache_dtype,
    )
    for layer in kv_caches:
        # An int8 cache's values cannot be NaN: its scales carry the poison.
        for tensor in (layer.key_scales, layer.value_scales) if layer.is_int8 else (layer.key, layer.value):
            tensor[engine.num_kv_blocks].fill_(float("nan"))
    graphs = DecodeGraphs(
        engine.model, kv_caches, engine.block_size, max_seq_len or engine.max_model_len, max_num_seqs=8,
        padding_block=engine.num_kv_blocks, device=engine.device, use_cuda_graphs=False,
        bounded_grids=bounded_grids,
    )
    padded_sizes: list[int] = []
    original_run = graphs.run

    def run(input_ids, positions, slot_mapping, seq_lens, block_tables):
        padded_sizes.append(graphs.padded_batch_size(len(input_ids)))
        if longest_contexts is not None:
            longest_contexts.append(max(seq_lens))
        return original_run(input_ids, positions, slot_mapping, seq_lens, block_tables)

    graphs.run = run
    engine.runner.kv_caches = kv_caches
    engine.runner.decode_graphs = graphs
    return padded_sizes


@pytest.mark.parametrize("variant", ["qwen3_qk_norm", "llama2"])
def test_padded_static_decode_matches_the_ordinary_path(tmp_path: Path, variant: str) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / variant, variant)
    prompts = [{"prompt_token_ids": random_token_ids(n, seed=n)} for n in PROMPT_LENGTHS]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]

    expected = _llm(model_dir).generate(prompts, params)
    llm = _llm(model_dir)
    padded_sizes = install_static_decode(llm)
    actual = llm.generate(prompts, params)

    for want, got in zip(expected, actual, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        assert len(got.outputs[0].token_ids) == len(want.outputs[0].token_ids)
    # Batches of 5, 4, 3, 2 and 1 decodes ran as graphs of 8, 4, 4, 2 and 1.
    assert set(padded_sizes) == {8, 4, 2, 1}
    assert llm.engine.kv_cache.num_free_blocks == llm.engine.num_kv_blocks
    # Padding rows wrote slot 0 of the spare block and nothing else; no real row read it.
    padding_keys = llm.engine.runner.kv_caches[0][0][llm.engine.num_kv_blocks]
    assert torch.isfinite(padding_keys[0]).all()
    assert torch.isnan(padding_keys[1:]).all()


def test_static_decode_keeps_seeded_sampling_and_logprobs(tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "m", "mistral")
    prompts = [{"prompt_token_ids": random_token_ids(n, seed=100 + n)} for n in (5, 22, 13)]
    params = [SamplingParams(temperature=0.9, top_p=0.9, seed=7 + i, max_tokens=10, ignore_eos=True, logprobs=2)
              for i in range(3)]

    expected = _llm(model_dir).generate(prompts, params)
    llm = _llm(model_dir)
    padded_sizes = install_static_decode(llm)
    actual = llm.generate(prompts, params)

    assert padded_sizes, "decode steps should have gone through the static path"
    for want, got in zip(expected, actual, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for want_step, got_step in zip(want.outputs[0].logprobs, got.outputs[0].logprobs, strict=True):
            assert want_step.keys() == got_step.keys()
            for token in want_step:
                assert got_step[token].logprob == pytest.approx(want_step[token].logprob, abs=1e-5)


def test_more_decodes_than_the_largest_graph_is_refused(tmp_path: Path) -> None:
    model_dir = write_tiny_checkpoint(tmp_path / "m", "llama2")
    llm = _llm(model_dir)
    install_static_decode(llm)
    graphs = llm.engine.runner.decode_graphs
    with pytest.raises(ValueError, match="exceed the largest graph"):
        graphs.run([1] * 9, [0] * 9, [0] * 9, [1] * 9, [[0]] * 9)


def test_contexts_longer_than_the_capture_bound_decode_eagerly(tmp_path: Path) -> None:
    """Graphs serve contexts up to max_seq_len_to_capture; a step with a longer one takes the
    ordinary path, and the tokens are the same either way."""
    model_dir = write_tiny_checkpoint(tmp_path / "m", "llama3_rope_scaling")
    prompts = [{"prompt_token_ids": random_token_ids(n, seed=n)} for n in (3, 9, 17)]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (12, 5, 9)]

    expected = _llm(model_dir).generate(prompts, params)
    llm = _llm(model_dir)
    longest_contexts: list[int] = []
    install_static_decode(llm, max_seq_len=20, longest_contexts=longest_contexts)
    actual = llm.generate(prompts, params)

    for want, got in zip(expected, actual, strict=True):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
    # The 17-token prompt reaches 20 tokens of context at its fourth decode and 25 at its last;
    # the 3-token one decodes alone up to 14 tokens of context after the others finish.
    assert longest_contexts and max(longest_contexts) == 20
    assert 14 in longest_contexts
    graphs = llm.engine.runner.decode_graphs
    assert graphs.covers(8, 20) and not graphs.covers(8, 21) and not graphs.covers(9, 20)


def test_block_table_rows_follow_requests_across_steps() -> None:
    """The host copy of the block tables is rewritten only where a row's block list changed:
    whatever the order of requests, growth, replacement (a preempted request's fresh list)
    or padding, each step's rows must equal that step's block lists."""
    graphs = DecodeGraphs(torch.nn.Identity(), [], block_size=4, max_seq_len=64, max_num_seqs=8,
                          padding_block=99, device=torch.device("cpu"), use_cuda_graphs=False)
    graphs._forward = lambda batch_size, metadata: torch.zeros(batch_size, 1)  # the tables are what is checked

    first, second, third, fourth = [1, 2], [3], [4, 5, 6], [14, 15]
    steps = [
        [first, second, third, fourth],
        [first, second, third],          # the fourth row pads (a batch of 3 runs as 4)
        [first, second, third, fourth],  # the same list back in the row the padding overwrote
        [first, second, third],
        [second, first, third],          # reordered
        [second, third],                 # one finished: rows shift, one padding row
        [second, first, third],          # back again
        [second, first, third],
        [[7, 8, 9, 10], first, third],   # a row gets another (fresh) list
    ]
    for step, tables in enumerate(steps):
        if step == 3:
            first.append(11)             # a list that grew since the last step
        if step == 7:
            third.extend([12, 13])
        num_seqs = len(tables)
        graphs.run([0] * num_seqs, [0] * num_seqs, [0] * num_seqs, [len(t) * 4 for t in tables], tables)
        padded = graphs.padded_batch_size(num_seqs)
        for row, table in enumerate(tables):
            assert graphs._block_tables[row, : len(table)].tolist() == table, (step, row)
        for row in range(num_seqs, padded):
            assert graphs._block_tables[row, 0].item() == 99, (step, row)

"""Workloads: length distributions, determinism, and each workload kind's shape."""

import json

import numpy as np
import pytest

from fitserve.bench.workload import LengthSpec, PromptMaker, WorkloadConfig, build_workload


def test_length_distributions_have_the_asked_mean_and_spread():
    rng = np.random.default_rng(0)
    assert LengthSpec(100).sample(rng, 5) == [100] * 5
    uniform = np.array(LengthSpec(100, "uniform", 0.5).sample(rng, 20000))
    assert uniform.min() >= 50 and uniform.max() <= 150 and uniform.mean() == pytest.approx(100, rel=0.02)
    normal = np.array(LengthSpec(200, "normal", 0.1).sample(rng, 20000))
    assert normal.mean() == pytest.approx(200, rel=0.02) and normal.std() == pytest.approx(20, rel=0.05)
    assert min(LengthSpec(2, "normal", 3.0).sample(rng, 1000)) >= 1  # clipped, never 0 or negative
    with pytest.raises(ValueError, match="distribution"):
        LengthSpec(10, "zipf")


def test_same_seed_same_workload_and_other_seed_differs():
    config = WorkloadConfig(num_requests=6, input_len=LengthSpec(20, "uniform"), seed=3)
    first = build_workload(config, PromptMaker())
    again = build_workload(config, PromptMaker())
    assert [c.turns[0].prompt for c in first] == [c.turns[0].prompt for c in again]
    other = build_workload(WorkloadConfig(num_requests=6, input_len=LengthSpec(20, "uniform"), seed=4), PromptMaker())
    assert [c.turns[0].prompt for c in first] != [c.turns[0].prompt for c in other]


def test_tokenizer_prompts_hit_the_exact_length(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    maker = PromptMaker(tokenizer)
    for length in (1, 7, 64, 300):
        config = WorkloadConfig(num_requests=10, input_len=LengthSpec(length), seed=1)
        for conversation in build_workload(config, maker):
            turn = conversation.turns[0]
            assert len(tokenizer.encode(turn.prompt, add_special_tokens=False)) == length
            assert turn.input_tokens == length


def test_shared_prefix_groups_share_their_prefix():
    config = WorkloadConfig(kind="shared-prefix", num_requests=8, prefix_len=30, num_prefixes=2,
                            input_len=LengthSpec(5), seed=0)
    conversations = build_workload(config, PromptMaker())
    prefixes = {}
    for conversation in conversations:
        words = conversation.turns[0].prompt.split()
        prefixes.setdefault(conversation.prefix_group, set()).add(" ".join(words[:30]))
        assert len(words) == 35
    assert set(prefixes) == {0, 1} and all(len(group) == 1 for group in prefixes.values())
    assert prefixes[0] != prefixes[1]


def test_multi_turn_makes_conversations_of_the_asked_turns():
    config = WorkloadConfig(kind="multi-turn", num_requests=10, num_turns=3, output_len=LengthSpec(7))
    conversations = build_workload(config, PromptMaker())
    assert len(conversations) == 3 and all(len(c.turns) == 3 for c in conversations)
    assert all(turn.output_tokens == 7 for c in conversations for turn in c.turns)


def test_sharegpt_takes_first_human_turn_and_reply_length(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([
        {"id": "a", "conversations": [{"from": "human", "value": "why is the sky blue"},
                                      {"from": "gpt", "value": "because of " * 9}]},
        {"id": "b", "conversations": [{"from": "gpt", "value": "starts with the model"},
                                      {"from": "human", "value": "skipped"}]},
        {"id": "c", "conversations": [{"from": "human", "value": "only one turn"}]},
    ]))
    conversations = build_workload(WorkloadConfig(kind="sharegpt", num_requests=3, dataset_path=str(path)),
                                   PromptMaker())
    assert [c.turns[0].prompt for c in conversations] == ["why is the sky blue"] * 3
    assert conversations[0].turns[0].output_tokens == 24  # 18 words · 4/3 without a tokenizer
    with pytest.raises(ValueError, match="dataset-path"):
        build_workload(WorkloadConfig(kind="sharegpt"), PromptMaker())
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"conversations": []}]))
    with pytest.raises(ValueError, match="no conversation"):
        build_workload(WorkloadConfig(kind="sharegpt", dataset_path=str(bad)), PromptMaker())

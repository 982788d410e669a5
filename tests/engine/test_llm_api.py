"""The user-facing behaviour of `LLM` and `LLMEngine`: stopping, sampling, streaming, errors.

A tiny random Llama with a real byte-level BPE tokenizer: its text is gibberish, but every
code path that a user of the Python API or CLI touches is the real one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from fitserve import LLM, SamplingParams
from fitserve.cli import main as cli_main
from fitserve.engine.engine import LLMEngine, PromptTooLongError
from fitserve.config import EngineArgs
from tests.tiny_models import random_token_ids, write_tiny_checkpoint, write_tiny_tokenizer

PROMPT = "Once upon a time there was a small model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = write_tiny_checkpoint(tmp_path_factory.mktemp("api") / "model", "llama3_rope_scaling")
    write_tiny_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> LLM:
    return LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8, max_num_batched_tokens=64)


def greedy(max_tokens: int = 12, **extra) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **extra)


def test_text_prompt_round_trip(llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    output = llm.generate(PROMPT, greedy())[0]
    assert output.prompt == PROMPT
    assert output.prompt_token_ids == tokenizer.encode(PROMPT)
    completion = output.outputs[0]
    assert len(completion.token_ids) == 12 and completion.finish_reason == "length"
    assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert output.metrics.arrival_time <= output.metrics.first_token_time <= output.metrics.finished_time


def test_stop_token_ids_end_the_sequence(llm: LLM) -> None:
    tokens = llm.generate(PROMPT, greedy())[0].outputs[0].token_ids
    stop_token = tokens[4]
    first_index = tokens.index(stop_token)
    completion = llm.generate(PROMPT, greedy(stop_token_ids=[stop_token]))[0].outputs[0]
    assert completion.token_ids == tokens[: first_index + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_token


def test_stop_strings_cut_the_text(llm: LLM) -> None:
    full = llm.generate(PROMPT, greedy(max_tokens=20))[0].outputs[0].text
    stop = full[5:8]
    cut = full.index(stop)
    completion = llm.generate(PROMPT, greedy(max_tokens=20, stop=[stop]))[0].outputs[0]
    assert completion.text == full[:cut]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop
    kept = llm.generate(PROMPT, greedy(max_tokens=20, stop=[stop], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == full[: cut + len(stop)]


def test_eos_stops_unless_ignored_and_respects_min_tokens(model_dir: Path, tmp_path: Path) -> None:
    # Make the token that greedy decoding produces third the model's EOS.
    probe = LLM(str(model_dir), dtype="float32", kv_cache_memory="4MiB")
    tokens = probe.generate(PROMPT, greedy())[0].outputs[0].token_ids
    eos = tokens[2]
    first_eos = tokens.index(eos)
    eos_dir = tmp_path / "eos-model"
    shutil.copytree(model_dir, eos_dir)
    config = json.loads((eos_dir / "config.json").read_text())
    config["eos_token_id"] = eos
    (eos_dir / "config.json").write_text(json.dumps(config))
    llm = LLM(str(eos_dir), dtype="float32", kv_cache_memory="4MiB")

    stopped = llm.generate(PROMPT, SamplingParams(max_tokens=12))[0].outputs[0]
    assert stopped.token_ids == tokens[: first_eos + 1] and stopped.finish_reason == "stop"
    ignored = llm.generate(PROMPT, SamplingParams(max_tokens=12, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"
    at_least = llm.generate(PROMPT, SamplingParams(max_tokens=12, min_tokens=first_eos + 2))[0].outputs[0]
    assert eos not in at_least.token_ids[: first_eos + 2]


def test_seeded_sampling_is_reproducible_whatever_the_batch(llm: LLM) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, max_tokens=16, ignore_eos=True, seed=1234)
    alone = llm.generate(PROMPT, params)[0].outputs[0].token_ids
    crowd = [SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True) for _ in range(3)]
    batch = llm.generate(["a", "b c", PROMPT, "d"], [crowd[0], crowd[1], params, crowd[2]])
    assert batch[2].outputs[0].token_ids == alone


def test_n_sequences_per_prompt(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=1.0, max_tokens=10, ignore_eos=True, seed=7)
    first = llm.generate([PROMPT, "hello world"], params)
    assert [len(o.outputs) for o in first] == [3, 3]
    assert [c.index for c in first[0].outputs] == [0, 1, 2]
    sequences = {tuple(c.token_ids) for c in first[0].outputs}
    assert len(sequences) > 1, "different seeds per sequence must give different samples"
    again = llm.generate([PROMPT, "hello world"], params)
    assert [c.token_ids for c in again[0].outputs] == [c.token_ids for c in first[0].outputs]


def test_logprobs_match_transformers(llm: LLM, model_dir: Path) -> None:
    prompt = random_token_ids(20, seed=5)
    output = llm.generate({"prompt_token_ids": prompt}, greedy(max_tokens=6, logprobs=3, prompt_logprobs=2))[0]
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    sequence = prompt + output.outputs[0].token_ids
    with torch.no_grad():
        log_probs = torch.log_softmax(reference(torch.tensor([sequence])).logits[0].float(), dim=-1)

    assert output.prompt_logprobs[0] is None
    assert len(output.prompt_logprobs) == len(prompt)
    for position in range(1, len(prompt)):
        entry = output.prompt_logprobs[position]
        token = prompt[position]
        assert entry[token].logprob == pytest.approx(log_probs[position - 1, token].item(), abs=1e-4)
        assert sum(1 for logprob in entry.values() if logprob.rank <= 2) == 2
    for step, token in enumerate(output.outputs[0].token_ids):
        entry = output.outputs[0].logprobs[step]
        row = log_probs[len(prompt) - 1 + step]
        assert entry[token].rank == 1  # greedy picked the best token
        top3 = torch.topk(row, 3).indices.tolist()
        assert set(top3) <= set(entry)
        for candidate in top3:
            assert entry[candidate].logprob == pytest.approx(row[candidate].item(), abs=1e-4)
            assert entry[candidate].decoded_token == llm.get_tokenizer().decode([candidate])
    assert output.outputs[0].cumulative_logprob == pytest.approx(
        sum(output.outputs[0].logprobs[i][t].logprob for i, t in enumerate(output.outputs[0].token_ids))
    )


def test_streaming_outputs_grow_monotonically_and_abort_frees_blocks(model_dir: Path) -> None:
    engine = LLMEngine(EngineArgs(model=str(model_dir), dtype="float32", kv_cache_memory="4MiB", block_size=8))
    for index in range(3):
        engine.add_request(f"r{index}", PROMPT + " " * index, greedy(max_tokens=30))
    seen: dict[str, tuple[str, list[int]]] = {}
    steps = 0
    finished: dict[str, str] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            text, tokens = output.outputs[0].text, output.outputs[0].token_ids
            previous_text, previous_tokens = seen.get(output.request_id, ("", []))
            assert text.startswith(previous_text) and tokens[: len(previous_tokens)] == previous_tokens
            seen[output.request_id] = (text, tokens)
            if output.finished:
                finished[output.request_id] = output.outputs[0].finish_reason
        steps += 1
        if steps == 4:
            engine.abort_request("r1")
            assert engine.get_stats().num_running == 2
    assert finished == {"r0": "length", "r1": "abort", "r2": "length"}
    assert len(seen["r1"][1]) < 30
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == stats.num_waiting == 0


def test_bad_requests_are_rejected_with_clear_errors(llm: LLM) -> None:
    engine = llm.engine
    with pytest.raises(PromptTooLongError, match="maximum context length is 256"):
        engine.add_request("long", {"prompt_token_ids": [5] * 300}, greedy())
    with pytest.raises(PromptTooLongError, match="250 in the prompt, 12 to generate"):
        engine.add_request("long2", {"prompt_token_ids": [5] * 250}, greedy())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("empty", {"prompt_token_ids": []}, greedy())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("vocab", [5, 100000], greedy())
    with pytest.raises(ValueError, match="stop token id 9999 is outside the vocabulary"):
        engine.add_request("stop", [5, 6], greedy(stop_token_ids=[9999]))
    for field, value in (("temperature", float("nan")), ("top_p", float("inf"))):
        with pytest.raises(ValueError, match=f"{field} must be a finite number"):
            SamplingParams(**{field: value})
    with pytest.raises(ValueError, match="seed must be an integer that fits in 64 bits"):
        SamplingParams(seed=2**70)
    engine.add_request("dup", [5, 6], greedy())
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("dup", [5, 6], greedy())
    engine.abort_request("dup")
    engine.step()
    assert not engine.has_unfinished_requests()


@pytest.mark.parametrize("model_given_as", ["--model", "MODEL_DIR"])
def test_cli_generate_prints_the_continuation(model_dir: Path, llm: LLM, capsys: pytest.CaptureFixture,
                                              model_given_as: str) -> None:
    """The model directory as `fitserve serve` takes it (positional) or as vLLM spells it."""
    expected = llm.generate(PROMPT, SamplingParams(max_tokens=8))[0].outputs[0].text
    model = ["--model", str(model_dir)] if model_given_as == "--model" else [str(model_dir)]
    code = cli_main(["generate", *model, "--prompt", PROMPT, "--max-tokens", "8",
                     "--dtype", "float32", "--kv-cache-memory", "4MiB"])
    assert code == 0
    assert capsys.readouterr().out == expected + "\n"


def test_cli_generate_refuses_two_different_models(model_dir: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["generate", str(model_dir), "--model", str(tmp_path / "other"), "--prompt", "hi"])
    assert code == 2
    assert "disagree; give one of them" in capsys.readouterr().err


def test_cli_reports_a_missing_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = cli_main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "hi"])
    assert code == 2
    error = capsys.readouterr().err
    assert "nope" in error and "error" in error


def test_cli_chat_streams_replies_and_keeps_the_conversation(model_dir: Path) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "fitserve.cli", "chat", "--model", str(model_dir), "--dtype", "float32",
         "--kv-cache-memory", "4MiB", "--max-tokens", "6"],
        input="hello there\nand again\n/exit\n", capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    replies = [line for line in result.stdout.split("> ") if line.strip()]
    assert len(replies) == 2, result.stdout
    assert "KV cache" in result.stderr  # the start-up summary names the capacity

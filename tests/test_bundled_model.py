"""The bundled default model: its card's numbers hold, and fitserve runs it like transformers.

Every fitserve command falls back to this model when no --model is given, so it must load
with stock transformers, match its published held-out perplexity, produce the same greedy
tokens under fitserve as under transformers, and render its chat template.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from fitserve.config import default_model_dir

MODEL_DIR = default_model_dir()
# Must match scripts/evaluate_bundled_model.py, which wrote eval.json.
PERPLEXITY_WINDOW = 512
MAX_NEW_TOKENS = 32
# Line slices of heldout.txt of different lengths (1 to 12 lines), each starting at code the
# model never trained on.
PROMPT_LINE_RANGES = [(300, 301), (2807, 2809), (4386, 4388), (2945, 2952), (2991, 3003), (1161, 1165)]


@pytest.fixture(scope="module")
def evaluation() -> dict:
    return json.loads((MODEL_DIR / "eval.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def hf_model() -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(MODEL_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def heldout_text() -> str:
    return (MODEL_DIR / "heldout.txt").read_text(encoding="utf-8")


def test_checkpoint_is_standard_and_small() -> None:
    config = json.loads((MODEL_DIR / "config.json").read_text())
    generation_config = json.loads((MODEL_DIR / "generation_config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"], "the model should exercise GQA"
    assert generation_config["eos_token_id"] == config["eos_token_id"]
    assert generation_config["bos_token_id"] == config["bos_token_id"]
    size = sum(path.stat().st_size for path in MODEL_DIR.iterdir() if path.is_file())
    assert size <= 40_000_000, "the wheel carries this directory"
    training = json.loads((MODEL_DIR / "training.json").read_text())
    assert 5_000_000 <= training["num_parameters"] <= 30_000_000, "a real model, yet small"
    assert len((MODEL_DIR / "heldout.txt").read_bytes()) <= 300_000


@torch.inference_mode()
def test_heldout_perplexity_matches_model_card(evaluation, tokenizer, hf_model, heldout_text) -> None:
    ids = tokenizer(heldout_text, add_special_tokens=False)["input_ids"]
    num_windows = evaluation["subset_windows"]
    windows = torch.tensor(ids[: num_windows * PERPLEXITY_WINDOW]).view(num_windows, PERPLEXITY_WINDOW)
    total_nll = 0.0
    for batch in windows.split(8):
        logits = hf_model(input_ids=batch).logits
        total_nll += torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        ).item()
    measured = math.exp(total_nll / windows[:, 1:].numel())

    assert windows[:, 1:].numel() == evaluation["subset_scored_tokens"]
    assert measured == pytest.approx(evaluation["subset_perplexity"], rel=0.01)
    # A trained model, not noise: an untrained one scores about the vocabulary size (~4000);
    # the shipped one measured 15.6.
    assert evaluation["heldout_perplexity"] < 25
    card = (MODEL_DIR / "README.md").read_text(encoding="utf-8")
    assert f"{evaluation['heldout_perplexity']:.3f}" in card
    assert f"{evaluation['subset_perplexity']:.3f}" in card


def _through_first_eos(token_ids: list[int], eos_token_id: int) -> list[int]:
    """Generation after EOS is not defined to match, so compare up to and including it."""
    return token_ids[: token_ids.index(eos_token_id) + 1] if eos_token_id in token_ids else token_ids


@torch.inference_mode()
def test_fitserve_greedy_matches_transformers(tokenizer, hf_model, heldout_text) -> None:
    from fitserve import LLM, SamplingParams

    lines = heldout_text.split("\n")
    prompts = ["\n".join(lines[first:end]) + "\n" for first, end in PROMPT_LINE_RANGES]
    llm = LLM(model=None, dtype="float32")  # None: the bundled model
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS))

    assert len(results) == len(prompts)
    prompt_lengths = set()
    for prompt, result in zip(prompts, results):
        prompt_ids = tokenizer(prompt)["input_ids"]
        prompt_lengths.add(len(prompt_ids))
        assert result.prompt_token_ids == prompt_ids, "fitserve must tokenize like transformers (BOS included)"
        expected = hf_model.generate(
            torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=MAX_NEW_TOKENS
        )[0, len(prompt_ids):].tolist()
        produced = list(result.outputs[0].token_ids)
        eos = tokenizer.eos_token_id
        assert _through_first_eos(produced, eos) == _through_first_eos(expected, eos), prompt
    assert len(prompt_lengths) == len(prompts), "the batch should mix prompt lengths"


def test_chat_template_renders_and_tokenizes(tokenizer) -> None:
    messages = [{"role": "user", "content": "Write a function that adds two numbers."}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|user|>\nWrite a function that adds two numbers.<|end|>\n<|assistant|>\n"

    encoded = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    ids = encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded
    marker_ids = [tokenizer.convert_tokens_to_ids(marker) for marker in ("<|user|>", "<|end|>", "<|assistant|>")]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert all(marker in ids for marker in marker_ids), "chat markers must be single special tokens"
    assert tokenizer.decode(ids) == text


def test_assets_are_package_data() -> None:
    import fitserve.assets

    package_dir = MODEL_DIR.parent
    assert package_dir.samefile(next(iter(fitserve.assets.__path__)))
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "eval.json", "heldout.txt"):
        assert (MODEL_DIR / name).is_file(), name


def test_greedy_continuations_look_like_the_corpus(evaluation) -> None:
    """The model card's samples, regenerated by fitserve: the same text as transformers wrote
    into eval.json, and Python-shaped (several lines, 4-space indentation, stdlib idioms)."""
    from fitserve import LLM, SamplingParams

    samples = evaluation["samples"]
    llm = LLM(model=None, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=evaluation["sample_new_tokens"], skip_special_tokens=False)
    results = llm.generate([sample["prompt"] for sample in samples], params)
    all_text = "".join(result.outputs[0].text for result in results)
    keywords = ("return", "if ", "raise", "else:", "for ", "except", "def ", "self", "None")
    found = [keyword for keyword in keywords if keyword in all_text]
    assert len(found) >= 5, found
    for sample, result in zip(samples, results, strict=True):
        text = result.outputs[0].text
        assert text == sample["continuation"], sample["prompt"]
        lines = [line for line in text.split("\n") if line.strip()]
        assert len(lines) >= 3, text
        indents = [len(line) - len(line.lstrip(" ")) for line in lines]
        # Statements sit at multiples of 4 spaces; a wrapped argument list may align with its
        # parenthesis, and the first line may continue the prompt's.
        on_grid = sum(indent % 4 == 0 for indent in indents[1:])
        assert on_grid >= 0.75 * len(indents[1:]), text


def test_def_prompt_continues_with_a_function() -> None:
    """`fitserve generate --prompt "def "` (the README's first command) must print code: a name
    with its parameters, then an indented body; the tokenizer prefixes <|bos|>, which the model
    was trained to see before code of any kind."""
    import re

    from fitserve import LLM, SamplingParams

    text = LLM(model=None, dtype="float32").generate("def ", SamplingParams(temperature=0, max_tokens=32))[0]
    continuation = text.outputs[0].text
    assert re.match(r"[A-Za-z_]\w*\(", continuation), continuation
    assert "\n    " in continuation, continuation

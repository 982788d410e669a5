"""Quality of the int8 KV cache on the bundled model, against the float cache, end to end.

Both caches run through the whole engine (`fitserve.LLM`, float32 weights, chunked prefill,
prefix caching on): perplexity of heldout.txt under the model card's protocol (consecutive
windows of 512 tokens, every token but a window's first scored from the tokens before it in
its window; here from the engine's prompt log-probs) and the greedy continuations of the
card's held-out snippets (eval.json's prompts, 64 new tokens). With the int8 cache a window's
tokens attend over their own quantized K/V, a stricter case than a cache that holds only
past tokens. Prints a JSON summary and writes it to --output if given.

    python scripts/evaluate_kv_cache_int8.py [--windows N] [--output benchmarks/results/kv_int8_quality.json]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from fitserve import LLM, SamplingParams
from fitserve.config import default_model_dir
from fitserve.quant.evaluate import PERPLEXITY_WINDOW
from fitserve.quant.evaluate import heldout_windows as windows_of



def heldout_windows(llm: LLM, num_windows: int | None) -> list[list[int]]:
    """The card's windows of heldout.txt (tokenized without special tokens)."""
    text = (default_model_dir() / "heldout.txt").read_text(encoding="utf-8")
    windows = windows_of(llm.engine.tokenizer(text, add_special_tokens=False)["input_ids"])
    return windows[:num_windows] if num_windows else windows


def perplexity(llm: LLM, windows: list[list[int]]) -> tuple[float, int]:
    """(perplexity, scored tokens) from the engine's prompt log-probs of each window."""
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    results = llm.generate([{"prompt_token_ids": window} for window in windows], params)
    total_nll, scored = 0.0, 0
    for window, result in zip(windows, results, strict=True):
        for token, position in zip(window[1:], result.prompt_logprobs[1:], strict=True):
            total_nll -= position[token].logprob
            scored += 1
    return math.exp(total_nll / scored), scored


def greedy_continuations(llm: LLM, prompts: list[str], new_tokens: int) -> list[list[int]]:
    results = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True))
    return [list(result.outputs[0].token_ids) for result in results]


def compare_continuations(reference: list[list[int]], other: list[list[int]]) -> dict:
    """Share of positions with the same token, and of tokens before the first difference."""
    same = sum(a == b for ref, oth in zip(reference, other) for a, b in zip(ref, oth))
    total = sum(len(ref) for ref in reference)
    prefixes = []
    for ref, oth in zip(reference, other):
        prefix = next((index for index, (a, b) in enumerate(zip(ref, oth)) if a != b), len(ref))
        prefixes.append(prefix)
    return {"identical_positions": same, "positions": total, "identical_share": round(same / total, 4),
            "common_prefix_tokens": prefixes, "common_prefix_share": round(sum(prefixes) / total, 4)}


def evaluate(num_windows: int | None) -> dict:
    torch.manual_seed(0)
    evaluation = json.loads((default_model_dir() / "eval.json").read_text(encoding="utf-8"))
    prompts = [sample["prompt"] for sample in evaluation["samples"]]
    summary: dict = {"model": "fitserve-tiny (bundled)", "weights": "float32", "window_tokens": PERPLEXITY_WINDOW}
    continuations = {}
    for kv_cache_dtype in ("auto", "int8"):
        llm = LLM(dtype="float32", kv_cache_dtype=kv_cache_dtype, kv_cache_memory="256MiB")
        windows = heldout_windows(llm, num_windows)
        ppl, scored = perplexity(llm, windows)
        summary[kv_cache_dtype] = {"perplexity": round(ppl, 4), "scored_tokens": scored,
                                   "kv_capacity_tokens": llm.engine.kv_capacity_tokens}
        continuations[kv_cache_dtype] = greedy_continuations(llm, prompts, evaluation["sample_new_tokens"])
        del llm
    summary["perplexity_increase"] = round(summary["int8"]["perplexity"] / summary["auto"]["perplexity"] - 1, 6)
    summary["greedy_continuations"] = compare_continuations(continuations["auto"], continuations["int8"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=None, help="only the first N windows (default: all)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    summary = evaluate(args.windows)
    text = json.dumps(summary, indent=1)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()

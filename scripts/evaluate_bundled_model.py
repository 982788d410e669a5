"""Measure the bundled model with transformers and write eval.json and the model card.

Run after ``train_bundled_model.py``. The numbers come from Hugging Face transformers in
float32 (the project's definition of correct), so the card describes the checkpoint itself,
not fitserve's implementation of it. ``tests/test_bundled_model.py`` re-measures the subset
perplexity and compares it with eval.json.

Perplexity protocol: tokenize heldout.txt without special tokens, cut the ids into
consecutive non-overlapping windows of PERPLEXITY_WINDOW tokens (the last one may be
shorter), score every token of a window except its first from the tokens before it in the
same window, and take exp(mean negative log-likelihood) over all scored tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model_card import render_model_card  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "fitserve" / "assets" / "fitserve-tiny"
from fitserve.quant.evaluate import PERPLEXITY_WINDOW  # noqa: E402
from fitserve.quant.evaluate import heldout_windows as windows_of  # noqa: E402
# The test re-measures only this many leading windows, to stay within seconds on CPU.
SUBSET_WINDOWS = 16
# (first line, end line) slices of heldout.txt used as sample prompts; chosen to start at a
# function definition and to differ in length.
SAMPLE_LINE_RANGES = [(300, 302), (2807, 2809), (4386, 4388), (2945, 2952), (2991, 3001)]
SAMPLE_NEW_TOKENS = 64


def heldout_windows(tokenizer, text: str, window: int = PERPLEXITY_WINDOW) -> list[list[int]]:
    return windows_of(tokenizer(text, add_special_tokens=False)["input_ids"], window)


@torch.inference_mode()
def perplexity(model: LlamaForCausalLM, windows: list[list[int]], batch_size: int = 8) -> tuple[float, int]:
    """(perplexity, number of scored tokens) under the protocol in the module docstring.

    Windows of equal length are batched; a shorter final window runs alone, so no padding
    (and no attention mask) ever enters the numbers.
    """
    total_nll, total_scored = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start : start + batch_size]
        groups = [[w for w in batch if len(w) == length] for length in sorted({len(w) for w in batch})]
        for group in groups:
            ids = torch.tensor(group)
            logits = model(input_ids=ids).logits.float()
            total_nll += torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1), reduction="sum"
            ).item()
            total_scored += ids[:, 1:].numel()
    return math.exp(total_nll / total_scored), total_scored


def sample_prompts(text: str) -> list[str]:
    """Held-out line slices, without their final newline: byte-level BPE merges a newline with
    the next line's indentation into one token, so a prompt ending in a bare newline asks the
    model to continue from a token split it rarely saw in training."""
    lines = text.split("\n")
    return ["\n".join(lines[first:end]) for first, end in SAMPLE_LINE_RANGES]


@torch.inference_mode()
def greedy_samples(model, tokenizer, prompts: list[str]) -> list[dict]:
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, do_sample=False, max_new_tokens=SAMPLE_NEW_TOKENS)
        samples.append({"prompt": prompt, "continuation": tokenizer.decode(out[0, ids.shape[1]:])})
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    args = parser.parse_args()
    torch.set_num_threads(2)

    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    text = (args.model_dir / "heldout.txt").read_text(encoding="utf-8")
    windows = heldout_windows(tokenizer, text)

    started = time.perf_counter()
    full_ppl, full_scored = perplexity(model, windows)
    full_seconds = time.perf_counter() - started
    subset_ppl, subset_scored = perplexity(model, windows[:SUBSET_WINDOWS])
    num_bytes = len(text.encode("utf-8"))
    full_bits_per_byte = math.log2(full_ppl) * full_scored / num_bytes
    print(f"held-out perplexity {full_ppl:.3f} over {full_scored} tokens ({full_seconds:.1f}s); "
          f"subset {subset_ppl:.3f} over {subset_scored}", flush=True)

    evaluation = {
        "protocol": {
            "framework": "transformers", "dtype": "float32", "text": "heldout.txt",
            "add_special_tokens": False, "window_tokens": PERPLEXITY_WINDOW, "stride_tokens": PERPLEXITY_WINDOW,
            "scored": "every token of a window except its first",
        },
        "heldout_bytes": num_bytes,
        "heldout_tokens": sum(len(w) for w in windows),
        "heldout_perplexity": round(full_ppl, 4),
        "heldout_scored_tokens": full_scored,
        "heldout_bits_per_byte_approx": round(full_bits_per_byte, 4),
        "subset_windows": SUBSET_WINDOWS,
        "subset_perplexity": round(subset_ppl, 4),
        "subset_scored_tokens": subset_scored,
        "sample_new_tokens": SAMPLE_NEW_TOKENS,
        "samples": greedy_samples(model, tokenizer, sample_prompts(text)),
    }
    (args.model_dir / "eval.json").write_text(json.dumps(evaluation, indent=1) + "\n", encoding="utf-8")
    training = json.loads((args.model_dir / "training.json").read_text(encoding="utf-8"))
    size_bytes = sum(p.stat().st_size for p in args.model_dir.iterdir() if p.is_file())
    (args.model_dir / "README.md").write_text(
        render_model_card(training, evaluation, model.config, size_bytes), encoding="utf-8"
    )
    print(f"wrote eval.json and README.md in {args.model_dir}")


if __name__ == "__main__":
    main()

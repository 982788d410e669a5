"""Tiny random checkpoints of every supported architecture, shared by the test suite.

Each variant starts from a real model's preset (so its architectural features are the real
ones) and shrinks the sizes, so a checkpoint is a few hundred kilobytes and a model test runs
in about a second on a busy CPU. transformers, loaded from the same files, is the reference.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from fitserve.models.random_checkpoint import write_random_checkpoint

TINY_SHAPES: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 512,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Each variant: (preset it starts from, overrides that make it tiny and exercise its feature).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama 3.1+ long-context rope; a short original context so most frequencies get scaled.
    "llama3_rope_scaling": ("llama-3.2-1b", {"head_dim": 16, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32}}),
    # Llama 2: plain rope, theta 1e4, full multi-head attention, separate lm_head.
    "llama2": ("llama-3-8b", {"rope_theta": 10000.0, "num_key_value_heads": 4,
                              "tie_word_embeddings": False}),
    "mistral": ("mistral-7b", {"head_dim": 16}),
    "qwen2_bias": ("qwen2.5-0.5b", {}),
    # head_dim 32 != hidden / heads, as in real Qwen3 checkpoints.
    "qwen3_qk_norm": ("qwen3-0.6b", {"head_dim": 32}),
}


def write_tiny_checkpoint(out_dir: Path, variant: str, dtype: str = "float32", **overrides: Any) -> Path:
    preset, variant_overrides = VARIANTS[variant]
    return write_random_checkpoint(
        out_dir, preset, dtype=dtype, seed=0, init_std=0.1,
        overrides=TINY_SHAPES | variant_overrides | overrides,
    )


def random_token_ids(length: int, seed: int, vocab_size: int = TINY_SHAPES["vocab_size"]) -> list[int]:
    """Reproducible prompt ids that avoid the special tokens 0..2."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (length,), generator=generator).tolist()


CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_TOKENIZER_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Serving language models to many users at once needs batching and a paged KV cache.",
    "Once upon a time there was a small model that wanted to tell stories.",
    "user system assistant hello world the a of and to in is it that",
    "0123456789 + - * / = ( ) [ ] { } , . ; : ! ? ' \"",
    "naïve café — 東京 ✓ 🙂",
]


def write_tiny_tokenizer(
    out_dir: Path, vocab_size: int = TINY_SHAPES["vocab_size"], corpus: list[str] | None = None
) -> None:
    """Train a byte-level BPE on a few sentences and save it as a transformers tokenizer.

    Ids 0, 1, 2 are <pad>, <s>, </s>, matching TINY_SHAPES' bos/eos ids; plain encoding
    starts with BOS, like Llama's tokenizers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tokenizer.train_from_iterator((corpus or _TOKENIZER_CORPUS) * 20, trainer=trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        chat_template=CHAT_TEMPLATE,
    )
    wrapped.save_pretrained(str(out_dir))

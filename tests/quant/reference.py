"""The reference a quantized model is judged by: transformers' float32 model of the dense
original, with every weight replaced by what fitserve's quantized model multiplies by."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from fitserve.models.loader import linear_layouts, load_model


@torch.no_grad()
def dequantized_transformers_model(dense_dir: Path, quantized_dir: Path):
    """transformers' model of `dense_dir` carrying the weights `quantized_dir` stands for
    (greedy generation never stops early: its eos is unset)."""
    model, config = load_model(quantized_dir, torch.float32, torch.device("cpu"), "torch")
    reference = AutoModelForCausalLM.from_pretrained(str(dense_dir), dtype=torch.float32).eval()
    reference.generation_config.eos_token_id = None
    parameters = dict(reference.named_parameters())
    for layout in linear_layouts(config):
        weight = model.get_submodule(layout.module_name).dequantized_weight()
        for part, rows in zip(layout.parts, weight.split([p.rows for p in layout.parts]), strict=True):
            parameters[f"{part.prefix}.weight"].copy_(rows)
    if config.tie_word_embeddings:
        parameters["model.embed_tokens.weight"].copy_(model.lm_head.dequantized_weight())
    return reference

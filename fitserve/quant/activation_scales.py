"""How large each projection's inputs are on calibration data: mean |x| per input channel.

BitStack scales every weight column by the magnitude of the input it multiplies before
decomposing, so the approximation spends its accuracy where the activations are large (an
error on a busy channel moves the output more). The magnitudes come from forward hooks on
Hugging Face transformers' float32 model (the project's reference implementation of the
architectures, as for MixLLM's salience), one calibration sample at a time.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

SCALE_FLOOR = 1e-2
"""Smallest scale relative to the matrix's mean one: a channel that was (almost) never active
on calibration text still keeps some weight in the decomposition."""


@torch.inference_mode()
def input_magnitudes(model_dir: Path, prefixes: list[str], samples: list[list[int]],
                     progress: Iterable | None = None) -> dict[str, torch.Tensor]:
    """mean |x| [in_features] (float32) of the input of every linear module named in `prefixes`
    (checkpoint prefixes such as "model.layers.0.mlp.down_proj"), over every calibration token."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    tokens = 0
    handles = []
    for prefix in prefixes:
        module = model.get_submodule(prefix)
        sums[prefix] = torch.zeros(module.in_features, dtype=torch.float64)

        def hook(_module, inputs, _output, prefix=prefix) -> None:
            x = inputs[0].detach()
            sums[prefix] += x.reshape(-1, x.shape[-1]).abs().sum(dim=0, dtype=torch.float64)

        handles.append(module.register_forward_hook(hook))
    try:
        for sample in progress if progress is not None else samples:
            model(input_ids=torch.tensor([sample]))
            tokens += len(sample)
    finally:
        for handle in handles:
            handle.remove()
    return {prefix: (total / max(tokens, 1)).float() for prefix, total in sums.items()}


def column_scales(magnitude: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """The decomposition's column scales from input magnitudes: magnitude ** alpha, normalized
    to a geometric mean of 1 (the stored factors stay in float16's comfortable range) and
    floored at SCALE_FLOOR. alpha = 0 is no scaling; 0.5 (the default) measured best on the
    bundled model (see benchmarks/bitstack_quality.py)."""
    scales = magnitude.float().clamp_min(1e-12) ** alpha
    scales = scales / scales.log().mean().exp()
    return scales.clamp_min(SCALE_FLOOR)

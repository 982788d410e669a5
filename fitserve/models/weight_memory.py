"""How many bytes a loaded model's weights hold, by format (the start-up banner and
benchmarks/weight_memory.py)."""

from __future__ import annotations

import torch

from fitserve.layers.linear import Linear


def _unique_bytes(tensors: list[torch.Tensor]) -> int:
    seen: set[int] = set()
    total = 0
    for tensor in tensors:
        if tensor.data_ptr() in seen:  # tied matrices count once
            continue
        seen.add(tensor.data_ptr())
        total += tensor.numel() * tensor.element_size()
    return total


def weight_memory_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and stored weight buffer (what a checkpoint holds, not
    tables derived at load such as rotary frequencies), and of the tensors weight formats
    hold outside them (BitStack's loaded blocks); shared tensors once. BitStack budgets and
    `fitserve quantize --method bitstack`'s sizes count the same bytes."""
    held = [tensor for module in model.modules() if isinstance(module, Linear)
            for tensor in module.weight_format.held_tensors(module)]
    return _unique_bytes([*model.state_dict(keep_vars=True).values(), *held])


def projection_bits_per_weight(model: torch.nn.Module) -> float:
    """Stored bits per weight of the decoder layers' projections (scales and zeros counted)."""
    layers = [module for name, module in model.named_modules()
              if isinstance(module, Linear) and name.startswith("model.layers.")]
    stored = sum(layer.stored_bytes() for layer in layers)
    return 8 * stored / sum(layer.in_features * layer.out_features for layer in layers)


"""BitStack checkpoints for tests, made from any dense checkpoint with the data-free
decomposition (fitserve.quant.bitstack.decompose without activation scaling) and a simple
level-wise block order: every matrix's block 1, then every matrix's block 2, and so on."""

from __future__ import annotations

from pathlib import Path

from fitserve.layers.weight_formats import FormatPlan
from fitserve.models.config import load_model_config
from fitserve.models.loader import _index_checkpoint, checkpoint_files, linear_layouts
from fitserve.quant.quantize import _copy_side_files, _quantized_tensors, _write_config


def write_bitstack_checkpoint(dense_dir: Path, out_dir: Path, num_blocks: int = 4, rank: int = 4,
                              perplexity_curve: list[tuple[float, float]] | None = None) -> Path:
    """`out_dir` holding a BitStack copy of `dense_dir` (LM head / tied embedding in w8)."""
    from safetensors.torch import save_file

    config = load_model_config(dense_dir)
    prefixes = [part.prefix for layout in linear_layouts(config) if layout.module_name != "lm_head"
                for part in layout.parts]
    plan = FormatPlan(method="bitstack", num_blocks=num_blocks, ranks={prefix: rank for prefix in prefixes},
                      block_order=[prefix for _ in range(1, num_blocks) for prefix in prefixes],
                      perplexity_curve=perplexity_curve or [], prequantized=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors, _, _ = _quantized_tensors(config, plan, _index_checkpoint(checkpoint_files(dense_dir)), False)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    _write_config(dense_dir, out_dir, plan)
    _copy_side_files(dense_dir, out_dir)
    return out_dir


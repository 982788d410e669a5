"""A model made by `fitserve quantize --method bitstack` loads at the budgets its summary
states: the runtime counts the same bytes as the quantizer (skipped until that command exists
in this tree)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve.models.loader import load_model
from tests.tiny_models import write_tiny_checkpoint, write_tiny_tokenizer

bitstack_quantize = pytest.importorskip("fitserve.quant.bitstack_quantize")


def test_the_quantizers_smallest_and_full_sizes_are_the_runtimes_range(tmp_path: Path) -> None:
    from fitserve.quant.quantize import quantize_model

    dense = write_tiny_checkpoint(tmp_path / "dense", "llama2")
    write_tiny_tokenizer(dense)
    options = bitstack_quantize.BitStackOptions(num_blocks=3, rank=4, ordering="residual", curve_points=0)
    summary = quantize_model(dense, tmp_path / "bitstack", "bitstack", progress=False, num_calibration_tokens=512,
                             bitstack=options)
    smallest, _ = load_model(tmp_path / "bitstack", torch.float32, torch.device("cpu"),
                             weight_memory=summary.smallest_loadable_bytes)
    elastic = smallest.elastic_weights
    assert (elastic.min_bytes, elastic.max_bytes) == (summary.smallest_loadable_bytes, summary.full_stack_bytes)
    assert elastic.current_bytes == summary.smallest_loadable_bytes
    elastic.set_budget(summary.full_stack_bytes)
    assert elastic.blocks_loaded == elastic.blocks_total

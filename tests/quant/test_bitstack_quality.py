"""BitStack on the bundled model, by the model card's perplexity protocol (first 16 held-out
windows): what `fitserve quantize --method bitstack` writes, and the issue's quality claims.

- Every stored block lowers (never raises) its matrix's activation-weighted residual norm, the
  norm the decomposition minimizes.
- With every block loaded, perplexity is within 2% of the original.
- Perplexity does not increase as the budget grows, at 8 budgets from the smallest loadable
  model to the full stack.
- Budgets load prefixes of the block order, within one block of the budget.

Small settings keep the file fast: 4 blocks per matrix, 2 calibration windows, the default
(calibrated) ordering's first-level losses on 256 tokens. (The residual proxy alone is not
enough here: on this model its first budget step raises perplexity, 36.1 -> 38.8;
benchmarks/bitstack_quality.py compares the orderings.)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from fitserve.config import default_model_dir
from fitserve.models.loader import load_model
from fitserve.quant import bitstack_budget, bitstack_order
from fitserve.quant.activation_scales import column_scales, input_magnitudes
from fitserve.quant.bitstack_evaluate import BitStackModel, evaluate_at_budget
from fitserve.quant.bitstack_quantize import BitStackOptions
from fitserve.quant.calibration import calibration_samples, default_calibration_text
from fitserve.quant.evaluate import perplexity

NUM_BLOCKS = 4
CALIBRATION_TOKENS = 1024
BUDGETS = 8


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two shared cores: one thread avoids oversubscription (several times faster here)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A slice of the default calibration text (the model's training files): tokenizing all
    4 MB of it would cost more than the rest of the quantization."""
    path = tmp_path_factory.mktemp("calibration") / "train.txt"
    path.write_text(default_calibration_text(default_model_dir(), max_chars=100_000).text, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def bitstack_dir(tmp_path_factory: pytest.TempPathFactory, calibration_file: Path) -> Path:
    from fitserve.quant.quantize import quantize_model

    out = tmp_path_factory.mktemp("bitstack")
    quantize_model(default_model_dir(), out, "bitstack", calibration_data=calibration_file,
                   num_calibration_tokens=CALIBRATION_TOKENS, force=True, progress=False,
                   # Rank 16: with only 4 blocks (for test time) the full stack must still come
                   # within 2% of the original; the benchmark's 16 blocks of rank auto do too.
                   bitstack=BitStackOptions(num_blocks=NUM_BLOCKS, rank=16, ordering_tokens=256,
                                            curve_points=2, curve_windows=1))
    return out


@pytest.fixture(scope="module")
def stacked(bitstack_dir: Path) -> BitStackModel:
    return BitStackModel(bitstack_dir)


@pytest.fixture(scope="module")
def calibration(calibration_file: Path) -> list[list[int]]:
    """The samples the quantization drew from the same file."""
    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    ids = tokenizer.encode(calibration_file.read_text(encoding="utf-8"), add_special_tokens=False).ids
    return calibration_samples(ids, CALIBRATION_TOKENS)


def test_the_directory_holds_the_spec_config(bitstack_dir: Path, stacked: BitStackModel) -> None:
    settings = json.loads((bitstack_dir / "config.json").read_text())["quantization_config"]
    assert settings["quant_method"] == "fitserve" and settings["method"] == "bitstack"
    assert settings["num_blocks"] == NUM_BLOCKS and settings["ordering"] == "calibrated"
    assert set(settings["ranks"].values()) == {16} and len(settings["ranks"]) == 6 * 7
    # Every block after each matrix's first appears once, block i after block i-1.
    assert sorted(settings["block_order"]) == sorted(p for p in settings["ranks"] for _ in range(NUM_BLOCKS - 1))
    smallest, full = stacked.budget_range()
    assert [point[0] for point in settings["perplexity_curve"]] == [smallest, full]
    assert full - stacked.fixed_bytes == sum(size * NUM_BLOCKS for size in stacked.block_sizes.values())
    with safe_open(str(bitstack_dir / "model.safetensors"), framework="pt") as file:
        names = set(file.keys())
    assert "model.embed_tokens.qweight" in names and "model.layers.0.mlp.down_proj.bitstack_signs" in names
    assert not any(name.endswith("proj.weight") for name in names)


def test_every_block_lowers_the_weighted_residual(stacked: BitStackModel, calibration: list[list[int]]) -> None:
    model_dir = default_model_dir()
    magnitudes = input_magnitudes(model_dir, stacked.prefixes, calibration)
    with safe_open(str(model_dir / "model.safetensors"), framework="pt") as file:
        for prefix, stack in stacked.stacks.items():
            scales = column_scales(magnitudes[prefix])
            weight = file.get_tensor(f"{prefix}.weight").float()
            norms = [float(torch.linalg.vector_norm((weight - stack.weight(depth)) * scales))
                     for depth in range(NUM_BLOCKS + 1)]
            assert all(later <= earlier * (1 + 1e-6) for earlier, later in zip(norms, norms[1:])), (prefix, norms)
            assert norms[-1] < 0.5 * norms[0], (prefix, norms)


def test_full_stack_is_within_two_percent_and_perplexity_falls_with_the_budget(
        bitstack_dir: Path, stacked: BitStackModel, windows: list[list[int]]) -> None:
    original_model, _ = load_model(default_model_dir(), torch.float32, torch.device("cpu"), "torch")
    original = perplexity(original_model, windows)
    smallest, full = stacked.budget_range()
    budgets = [smallest + (full - smallest) * i // (BUDGETS - 1) for i in range(BUDGETS)]
    # As fitserve runs it: the directory loaded under each budget (`--weight-memory`).
    results = [evaluate_at_budget(bitstack_dir, budget, windows) for budget in budgets]
    assert abs(results[-1] / original - 1) < 0.02, (results[-1], original)
    assert all(later <= earlier for earlier, later in zip(results, results[1:])), results
    assert results[0] > 1.5 * results[-1], results  # the budgets span a real range
    # The dense stand-in (used to order blocks and sweep budgets) multiplies by the same partial
    # sums, and the curve written at quantize time (on the first window) agrees with it.
    assert [stacked.perplexity(budget, windows) for budget in (smallest, full)] == \
        pytest.approx([results[0], results[-1]], rel=1e-4)
    first = [stacked.perplexity(budget, windows[:1]) for budget in (smallest, full)]
    curve = json.loads((bitstack_dir / "config.json").read_text())["quantization_config"]["perplexity_curve"]
    assert [point[1] for point in curve] == pytest.approx(first, rel=1e-4)


def test_budgets_load_prefixes_of_the_order_within_one_block(stacked: BitStackModel) -> None:
    smallest, full = stacked.budget_range()
    with pytest.raises(bitstack_budget.BudgetError, match="below the smallest loadable model"):
        stacked.load_budget(smallest - 1)
    largest_block = max(stacked.block_sizes.values())
    previous = None
    for budget in (smallest, smallest + 123_456, (smallest + full) // 2, full - 1, full):
        held = stacked.load_budget(budget)
        assert budget - largest_block < held <= budget
        depths = dict(stacked.stand_in.depths)
        if previous is not None:
            assert all(depths[prefix] >= previous[prefix] for prefix in depths)
        previous = depths
    assert stacked.load_budget(full) == full and set(previous.values()) == {NUM_BLOCKS}


def test_chains_merge_by_value_per_byte_and_keep_block_order() -> None:
    # b's second block is worth a lot but needs its first, worth little: both come before a's.
    values = {"a": [5.0, 1.0], "b": [0.5, 20.0], "c": [3.0, 2.2]}
    order = bitstack_order.merge_order(values, {"a": 1, "b": 1, "c": 2})
    assert order == ["b", "b", "a", "c", "c", "a"]
    assert bitstack_order.chain_values([1.0, 5.0, 0.0]) == [3.0, 3.0, 0.0]

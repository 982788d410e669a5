"""Loading a BitStack checkpoint at a memory budget: which blocks are read and kept, what the
layers multiply by, how bytes are counted, and the errors for budgets and configs."""

from __future__ import annotations

import gc
import json
import shutil
from collections import Counter
from pathlib import Path

import psutil
import pytest
import torch
from safetensors import safe_open

from fitserve.config import ConfigError, EngineArgs
from fitserve.layers.weight_formats import FormatPlan, FormatPlanError
from fitserve.layers.weight_formats.bitstack import BitStackFormat
from fitserve.layers.weight_formats.source import TensorSource
from fitserve.models.config import ModelLoadError
from fitserve.models.elastic_weights import WeightBudgetError, interpolate
from fitserve.models.loader import load_model
from fitserve.models.weight_memory import weight_memory_bytes
from fitserve.quant.bitstack_packing import SIGNS, U, V, dequantize_blocks
from fitserve.models.random_checkpoint import write_random_bitstack_checkpoint
from tests.bitstack_models import write_bitstack_checkpoint
from tests.tiny_models import write_tiny_checkpoint

NUM_BLOCKS = 4


@pytest.fixture(scope="module")
def bitstack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dense = write_tiny_checkpoint(tmp_path_factory.mktemp("dense"), "qwen2_bias")
    return write_bitstack_checkpoint(dense, tmp_path_factory.mktemp("bitstack"), num_blocks=NUM_BLOCKS, rank=4)


def _load(model_dir: Path, weight_memory: int | None = None):
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"), weight_memory=weight_memory)
    return model


def _order(model_dir: Path) -> list[str]:
    return json.loads((model_dir / "config.json").read_text())["quantization_config"]["block_order"]


def _bitstack_layers(model):
    return [module for module in model.modules() if isinstance(getattr(module, "weight_format", None), BitStackFormat)]


def test_a_budget_loads_the_longest_prefix_of_the_order_that_fits(bitstack_dir: Path) -> None:
    full = _load(bitstack_dir).elastic_weights
    order = _order(bitstack_dir)
    for fraction in (0.0, 0.3, 0.55, 1.0):
        budget = int(full.min_bytes + fraction * (full.max_bytes - full.min_bytes))
        model = _load(bitstack_dir, budget)
        info = model.elastic_weights.info()
        depths = {part.shape.prefix: part.depth for layer in _bitstack_layers(model)
                  for part in layer.weight_format.parts}
        loaded = info.blocks_loaded - len(depths)
        expected = Counter(order[:loaded])
        assert depths == {prefix: 1 + expected[prefix] for prefix in depths}
        # Within one block of the budget, and the meter agrees with the accounting.
        assert info.current_bytes <= budget
        if loaded < len(order):
            next_block = next(part.block_bytes for layer in _bitstack_layers(model)
                              for part in layer.weight_format.parts if part.shape.prefix == order[loaded])
            assert budget < info.current_bytes + next_block
        assert weight_memory_bytes(model) == info.current_bytes


def test_layers_multiply_by_the_sum_of_their_loaded_blocks(bitstack_dir: Path) -> None:
    model = _load(bitstack_dir, (lambda e: (e.min_bytes + e.max_bytes) // 2)(_load(bitstack_dir).elastic_weights))
    layer = model.model.layers[1].mlp.gate_up_proj
    parts = layer.weight_format.parts
    assert [part.shape.prefix for part in parts] == ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"]
    with safe_open(str(bitstack_dir / "model.safetensors"), framework="pt") as file:
        expected = torch.cat([
            dequantize_blocks(*(file.get_tensor(f"{part.shape.prefix}.{suffix}")[:part.depth] for suffix in (SIGNS, U, V)),
                              part.shape.in_features)
            for part in parts])
    assert 1 <= parts[0].depth < NUM_BLOCKS
    torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=1e-5, atol=1e-6)
    # Whichever kernel runs (the compiled one rounds activations to int8 per block and rank),
    # it multiplies by that weight.
    x = torch.randn(3, layer.in_features)
    reference = torch.nn.functional.linear(x, expected, layer.bias)
    assert torch.linalg.vector_norm(layer(x) - reference) < 0.02 * torch.linalg.vector_norm(reference)


def test_the_loader_reads_only_the_blocks_it_keeps(bitstack_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[tuple[str, int]] = []
    original = TensorSource.read

    def counting(self, name: str, index: int) -> torch.Tensor:
        reads.append((name, index))
        return original(self, name, index)

    monkeypatch.setattr(TensorSource, "read", counting)
    full = _load(bitstack_dir).elastic_weights
    reads.clear()
    model = _load(bitstack_dir, full.min_bytes)
    assert {index for _, index in reads} == {0}
    num_matrices = model.elastic_weights.blocks_loaded
    assert len(reads) == len(set(reads)) == 3 * num_matrices
    reads.clear()
    model.elastic_weights.set_budget(full.max_bytes)  # growing reads only the blocks it adds
    assert len(reads) == len(set(reads)) == 3 * (full.blocks_total - num_matrices)
    assert 0 not in {index for _, index in reads}


def test_shrink_then_grow_restores_the_same_weights(bitstack_dir: Path) -> None:
    model = _load(bitstack_dir)
    elastic = model.elastic_weights
    layer = model.model.layers[0].self_attn.qkv_proj
    before = layer.dequantized_weight()
    elastic.set_budget(elastic.min_bytes)
    assert not torch.equal(layer.dequantized_weight(), before)
    elastic.set_budget(elastic.max_bytes)
    assert torch.equal(layer.dequantized_weight(), before)


def test_budgets_outside_the_range_are_refused_with_the_range(bitstack_dir: Path) -> None:
    elastic = _load(bitstack_dir).elastic_weights
    low, high = f"{elastic.min_bytes / 2**20:.2f} MiB", f"{elastic.max_bytes / 2**20:.2f} MiB"
    for budget, why in ((elastic.min_bytes - 1, "below the smallest loadable model"),
                        (elastic.max_bytes + 1, "above the full model")):
        with pytest.raises(WeightBudgetError, match=why) as raised:
            _load(bitstack_dir, budget)
        message = str(raised.value)
        assert "\n" not in message and f"between {low} and {high}" in message
    with pytest.raises(ConfigError):  # WeightBudgetError is a ConfigError: the CLIs print it as one line
        elastic.check_budget(elastic.max_bytes + 1)


def test_weight_memory_needs_a_bitstack_model(tmp_path: Path) -> None:
    dense = write_tiny_checkpoint(tmp_path, "qwen2_bias")
    with pytest.raises(ModelLoadError, match="--weight-memory needs a BitStack model"):
        load_model(dense, torch.float32, torch.device("cpu"), weight_memory=10**6)


@pytest.mark.parametrize("value", ["lots", "-5MiB", 0])
def test_unreadable_or_non_positive_weight_memory_is_a_config_error(value) -> None:
    with pytest.raises(ConfigError, match="memory"):
        EngineArgs(weight_memory=value)


def test_bad_bitstack_configs_name_the_entry(bitstack_dir: Path, tmp_path: Path) -> None:
    raw = json.loads((bitstack_dir / "config.json").read_text())["quantization_config"]
    with pytest.raises(FormatPlanError, match="block_order names 'nowhere'"):
        FormatPlan.from_config({**raw, "block_order": ["nowhere"]})
    prefix = raw["block_order"][0]
    with pytest.raises(FormatPlanError, match=f"lists '{prefix}' {NUM_BLOCKS} times"):
        FormatPlan.from_config({**raw, "block_order": [prefix] * NUM_BLOCKS})
    with pytest.raises(FormatPlanError, match="num_blocks"):
        FormatPlan.from_config({**raw, "num_blocks": 0})
    with pytest.raises(FormatPlanError, match="perplexity_curve"):
        FormatPlan.from_config({**raw, "perplexity_curve": [[1, "high"]]})
    with pytest.raises(FormatPlanError, match="bitstack needs calibration"):
        FormatPlan(method="bitstack")
    # A rank for a matrix the model does not have: loading names it.
    copy = tmp_path / "copy"
    shutil.copytree(bitstack_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["quantization_config"]["ranks"]["extra.matrix"] = 4
    config["quantization_config"]["block_order"].append("extra.matrix")
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="'extra.matrix', which is not a matrix of this model"):
        _load(copy)


def test_the_banner_curve_is_interpolated_only_where_it_was_measured() -> None:
    curve = [(100.0, 20.0), (200.0, 10.0)]
    assert interpolate(curve, 150) == pytest.approx(15.0)
    assert interpolate(curve, 200) == 10.0
    assert interpolate(curve, 99) is None and interpolate([], 150) is None


def test_resident_memory_falls_after_a_shrink(tmp_path: Path) -> None:
    # ~100 MiB of blocks, so the drop stands far above allocator and interpreter noise.
    shapes = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 8,
              "num_key_value_heads": 2, "head_dim": 128, "vocab_size": 256, "max_position_embeddings": 64,
              "rope_scaling": None}
    model_dir = write_random_bitstack_checkpoint(tmp_path, "llama-3.2-1b", num_blocks=10, rank=16, overrides=shapes)
    process = psutil.Process()
    model = _load(model_dir)
    elastic = model.elastic_weights
    freed = elastic.max_bytes - elastic.min_bytes
    assert freed > 80 * 2**20
    gc.collect()
    full_rss = process.memory_info().rss
    elastic.set_budget(elastic.min_bytes)
    gc.collect()
    small_rss = process.memory_info().rss
    assert full_rss - small_rss > 0.8 * freed
    elastic.set_budget(elastic.max_bytes)
    assert process.memory_info().rss - small_rss > 0.8 * freed


@pytest.mark.parametrize("columns", [13, 64])
def test_in_memory_stacks_equal_the_layout_reference_at_every_depth(columns: int) -> None:
    from fitserve.layers.linear import Linear
    from fitserve.layers.weight_formats import PartShape
    from fitserve.quant.bitstack import decompose

    parts = [PartShape("a", 5, columns), PartShape("b", 3, columns)]
    weights = {part.prefix: torch.randn(part.rows, columns) for part in parts}
    stacks = {prefix: dict(zip((SIGNS, U, V), decompose(weight, None, 3, 2))) for prefix, weight in weights.items()}
    weight_format = BitStackFormat({"a": 2, "b": 2}, num_blocks=3)
    layer = Linear(columns, 8, False, None, weight_format)
    weight_format.load_parts(layer, [(part, stacks[part.prefix]) for part in parts], torch.device("cpu"))
    for depth in (3, 1, 2):
        for part in weight_format.parts:
            weight_format.set_blocks(layer, part, [part.read_block(index) for index in range(depth)])
        expected = torch.cat([dequantize_blocks(*(stacks[part.prefix][suffix][:depth] for suffix in (SIGNS, U, V)),
                                                columns) for part in parts])
        torch.testing.assert_close(layer.dequantized_weight(), expected, rtol=1e-5, atol=1e-6)
        assert weight_format.stored_bytes(layer) == sum(depth * part.block_bytes for part in weight_format.parts)

"""Quality of the quantized formats on the bundled model, by the model card's perplexity
protocol (first 16 held-out windows, float32 activations).

- Each format is what it claims: fitserve's perplexity equals transformers' on the weights
  the format stands for (dequantized), within 0.1%.
- w8 costs at most 0.5% perplexity; mixllm at 10% at most half of w4's increase.
- MixLLM's salience beats random channel choices of the same size, and perplexity falls as
  the high-precision fraction grows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from fitserve.config import default_model_dir
from fitserve.layers.linear import Linear
from fitserve.layers.weight_formats import PartShape
from fitserve.models.loader import linear_layouts, load_model
from fitserve.quant.calibration import calibration_samples, default_calibration_text
from fitserve.quant.evaluate import perplexity
from fitserve.quant.salience import channel_salience, select_random, select_salient
from tests.quant.reference import dequantized_transformers_model

CPU = torch.device("cpu")
FRACTIONS = (0.0, 0.1, 0.2, 1.0)
CALIBRATION_TOKENS = 4096
REFERENCE_WINDOWS = 4
"""Windows for the exactness check against transformers (equality needs no large sample)."""


def fitserve_perplexity(model_dir: Path, windows: list[list[int]]) -> float:
    model, _ = load_model(model_dir, torch.float32, CPU, "torch")
    return perplexity(model, windows)


@torch.inference_mode()
def transformers_perplexity_of_dequantized(model_dir: Path, windows: list[list[int]]) -> float:
    """transformers' perplexity, by the card's protocol, on the weights `model_dir` stands for."""
    reference = dequantized_transformers_model(default_model_dir(), model_dir)
    total = scored = 0.0
    for window in windows:
        ids = torch.tensor([window])
        logits = reference(input_ids=ids).logits[0, :-1].float()
        total += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
        scored += len(window) - 1
    return math.exp(total / scored)


@pytest.fixture(scope="module")
def original(windows: list[list[int]]) -> float:
    return fitserve_perplexity(default_model_dir(), windows)


@pytest.fixture(scope="module")
def projection_parts() -> list[PartShape]:
    from fitserve.models.config import load_model_config

    config = load_model_config(default_model_dir())
    return [part for layout in linear_layouts(config) if layout.module_name != "lm_head" for part in layout.parts]


@pytest.fixture(scope="module")
def salience(projection_parts: list[PartShape]) -> dict[str, torch.Tensor]:
    model_dir = default_model_dir()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = tokenizer.encode(default_calibration_text(model_dir, max_chars=400_000).text, add_special_tokens=False).ids
    return channel_salience(model_dir, projection_parts, calibration_samples(ids, CALIBRATION_TOKENS), 128)


@pytest.mark.parametrize("method", ["w8", "w4", "mixllm"])
def test_fitserve_perplexity_equals_the_dequantized_reference(method: str, quantized: Callable[..., Path],
                                                             windows: list[list[int]],
                                                             projection_parts: list[PartShape]) -> None:
    options = {"high_channels": select_random(projection_parts, 0.1, seed=0)} if method == "mixllm" else {}
    model_dir = quantized(method, **options)
    ours = fitserve_perplexity(model_dir, windows[:REFERENCE_WINDOWS])
    reference = transformers_perplexity_of_dequantized(model_dir, windows[:REFERENCE_WINDOWS])
    assert abs(ours / reference - 1) < 1e-3, (ours, reference)


def test_w8_costs_under_half_a_percent(quantized, windows, original) -> None:
    assert fitserve_perplexity(quantized("w8"), windows) / original - 1 < 0.005


def test_mixllm_salience_beats_random_channels_and_halves_w4s_loss(quantized, windows, original, salience,
                                                                 projection_parts) -> None:
    w4_increase = fitserve_perplexity(quantized("w4"), windows) - original
    chosen = select_salient(salience, projection_parts, 0.1)
    mixllm_increase = fitserve_perplexity(quantized("mixllm", high_channels=chosen), windows) - original
    random_increases = [
        fitserve_perplexity(quantized("mixllm", high_channels=select_random(projection_parts, 0.1, seed)),
                            windows) - original
        for seed in range(3)
    ]
    assert 0 < mixllm_increase <= 0.5 * w4_increase, (mixllm_increase, w4_increase)
    assert mixllm_increase < sum(random_increases) / 3, (mixllm_increase, random_increases)


def test_perplexity_falls_as_the_high_precision_fraction_grows(quantized, windows, salience,
                                                             projection_parts) -> None:
    results = [fitserve_perplexity(quantized("mixllm", high_channels=select_salient(salience, projection_parts, f)),
                                   windows) for f in FRACTIONS]
    assert results == sorted(results, reverse=True) and len(set(results)) == len(results), results


def test_salient_selection_fills_the_weight_budget(salience, projection_parts) -> None:
    chosen = select_salient(salience, projection_parts, 0.1)
    width = {part.prefix: part.in_features for part in projection_parts}
    promoted = sum(len(rows) * width[prefix] for prefix, rows in chosen.items())
    total = sum(part.rows * part.in_features for part in projection_parts)
    assert 0.1 * total - max(width.values()) <= promoted <= 0.1 * total
    # Global, not per layer: layers do not all get the same share.
    shares = {prefix: len(rows) / part.rows for part in projection_parts for prefix, rows in chosen.items()
              if prefix == part.prefix}
    assert max(shares.values()) > 2 * min(shares.values())


def test_quantized_layers_report_their_stored_bits(quantized) -> None:
    model, _ = load_model(quantized("w4"), torch.float32, CPU, "torch")
    layer = model.model.layers[0].mlp.gate_up_proj
    assert isinstance(layer, Linear) and layer.weight_format.name == "w4"
    assert layer.weight_format.bits_per_weight(layer) == pytest.approx(4 + 24 / 128)

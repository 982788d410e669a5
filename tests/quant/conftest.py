"""Shared material for the quantization tests: the bundled model's held-out windows (the
model card's subset) and quantized copies of the bundled model, made once per session."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from fitserve.config import default_model_dir
from fitserve.quant.evaluate import heldout_windows

SUBSET_WINDOWS = 16
"""The model card's test subset: the first 16 windows of heldout.txt."""


@pytest.fixture(scope="session")
def windows() -> list[list[int]]:
    model_dir = default_model_dir()
    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = (model_dir / "heldout.txt").read_text(encoding="utf-8")
    return heldout_windows(tokenizer.encode(text, add_special_tokens=False).ids)[:SUBSET_WINDOWS]


@pytest.fixture(scope="session")
def quantized(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """quantized(method, **options) -> a quantized copy of the bundled model (cached by arguments)."""
    from fitserve.quant.quantize import quantize_model

    made: dict[str, Path] = {}

    def make(method: str, **options) -> Path:
        key = method + repr(sorted((k, repr(v)) for k, v in options.items()))
        if key not in made:
            out = tmp_path_factory.mktemp(method)
            quantize_model(default_model_dir(), out, method, force=True, progress=False, **options)
            made[key] = out
        return made[key]

    return make

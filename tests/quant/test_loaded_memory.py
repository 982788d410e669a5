"""A quantized model holds its weights in its own memory after loading: safetensors maps the
file and hands back views of it, and one view kept alive would keep every page of the file read
during loading resident too (the whole checkpoint, on top of the loaded weights)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fitserve.models.loader import load_model


def _mapped_files() -> set[str]:
    return {line.split(maxsplit=5)[5].strip() for line in Path("/proc/self/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc to list file mappings")
@pytest.mark.parametrize("method", ["w8", "w4"])
def test_checkpoint_file_is_not_mapped_after_loading(quantized, method: str) -> None:
    model_dir = quantized(method)
    model, _ = load_model(model_dir, torch.float32, torch.device("cpu"))
    checkpoint = str((model_dir / "model.safetensors").resolve())
    assert checkpoint not in _mapped_files()
    assert model.model.embed_tokens.qweight.dtype == torch.int8  # tied embedding stays quantized

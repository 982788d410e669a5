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


@pytest.mark.parametrize("method", ["w4", "mixllm"])
def test_integer_weights_sit_in_one_huge_page_arena_and_compute_the_same(quantized, method: str) -> None:
    from fitserve.layers.linear import Linear
    from fitserve.models import host_memory

    model_dir = quantized(method)
    arena, _ = load_model(model_dir, torch.float32, torch.device("cpu"))
    plain, _ = load_model(model_dir, torch.float32, torch.device("cpu"), huge_pages=False)
    integer = [(name, module) for name, module in arena.named_modules()
               if isinstance(module, Linear) and not module.is_dense]
    held = [t for _, module in integer for t in module.weight_format.tensors(module).values()]
    held += [arena.model.embed_tokens.qweight, arena.model.embed_tokens.scales]
    storages = {t.untyped_storage().data_ptr() for t in held}
    if not host_memory.huge_pages_available():
        assert len(storages) > 1
        return
    assert len(storages) == 1  # one arena (the dense parameters have their own)
    # The CPU kernels repack in place: the weights stay in the arena, and compute what they did.
    x = torch.randn(3, arena.config.hidden_size)
    for name, module in integer:
        inputs = x if module.in_features == x.shape[1] else torch.randn(3, module.in_features)
        other = plain.get_submodule(name)
        assert torch.equal(module(inputs), other(inputs)), name
        assert torch.equal(module.dequantized_weight(), other.dequantized_weight()), name
        assert {t.untyped_storage().data_ptr() for t in module.weight_format.tensors(module).values()} == storages
    ids = torch.tensor([0, 5, 100])
    assert torch.equal(arena.model.embed_tokens(ids), plain.model.embed_tokens(ids))

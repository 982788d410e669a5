"""A w4 / w8 / MixLLM Linear on AVX-512 VNNI: the kernel repacks the integer tensors into the
lanes layouts in place (the weights stay in memory once, where the loader put them), while
everything that reads the codes back still sees the format's weights; an int8 embedding tied
to a w8 LM head follows the matrix it shares."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.embedding import Int8Embedding
from fitserve.layers.linear import Linear
from fitserve.layers.weight_formats.mixllm import MixedFormat
from fitserve.layers.weight_formats.w4 import W4Format
from fitserve.layers.weight_formats.w8 import W8Format
from fitserve.quant import packing

kernels = cpu_kernels.get()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.has_avx512_vnni(),
                                reason="the lanes layouts are AVX-512 VNNI's")

PREFIX = "model.layers.0.mlp.down_proj"


def quantized_linear(weight_format, weight: torch.Tensor) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], True, cpu_kernels.MatmulScratch(), weight_format)
    torch.nn.init.normal_(layer.bias)
    weight_format.quantize(layer, weight, PREFIX)
    return layer


def expected_lanes(fmt: str, loaded: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The codes buffers the kernel should hold, repacked from the loaded ones."""
    if fmt == "w8":
        return {"qweight": packing.pack_w8_lanes(loaded["qweight"])}
    lanes = {"qweight": packing.pack_w4_lanes(loaded["qweight"], loaded["scales"], loaded["zeros"], 64)[0]}
    if fmt == "mixllm":
        lanes["qweight_hp"] = packing.pack_w8_lanes(loaded["qweight_hp"])
    return lanes


@pytest.mark.parametrize("fmt", ["w4", "w8", "mixllm"])
def test_layer_holds_the_kernels_lanes_tensors_and_reads_back_the_format(fmt):
    weight = torch.randn(37, 256)
    weight_format = {"w4": W4Format(64), "w8": W8Format(),
                     "mixllm": MixedFormat({PREFIX: [3, 20]}, 64)}[fmt]
    layer = quantized_linear(weight_format, weight)
    before = layer.dequantized_weight()
    storage = {name: tensor.data_ptr() for name, tensor in layer.weight_format.tensors(layer).items()}
    loaded = {name: tensor.clone() for name, tensor in layer.weight_format.tensors(layer).items()}
    x = torch.randn(5, 256)
    out = layer(x)
    lanes = expected_lanes(fmt, loaded)
    assert layer.held_layouts == {name: "lanes" for name in lanes}
    assert layer.cpu_kernel_object.part_layouts() == ["lanes"] * len(lanes)
    for name, tensor in lanes.items():
        assert torch.equal(getattr(layer, name), tensor)
    assert {name: tensor.data_ptr() for name, tensor in layer.weight_format.tensors(layer).items()} == storage
    assert torch.equal(layer.dequantized_weight(), before)
    assert layer.stored_bytes() == sum(t.numel() * t.element_size() for t in loaded.values())
    # Rebuilt from the lanes tensors it holds (as after invalidate): the same kernel, same result.
    held = layer.qweight.data_ptr()
    layer.invalidate()
    assert torch.equal(layer(x), out)
    assert layer.qweight.data_ptr() == held and layer.held_layouts == {name: "lanes" for name in lanes}
    # New tensors in the format's layout start over from the row layout.
    layer.weight_format.quantize(layer, weight, PREFIX)
    assert layer.held_layouts == {}
    assert torch.equal(layer.dequantized_weight(), before)
    assert torch.equal(layer(x), out)


def test_tied_int8_embedding_follows_the_lm_heads_lanes_matrix():
    vocab, hidden = 37, 64
    embedding = Int8Embedding(vocab, hidden, torch.float32)
    embedding.quantize(torch.randn(vocab, hidden))
    rows_layout = embedding.qweight.clone()
    ids = torch.tensor([[0, 36, 17], [15, 16, 31]])  # rows of full blocks and of the short last one
    looked_up = embedding(ids)
    head = Linear(hidden, vocab, False, cpu_kernels.MatmulScratch(), W8Format())
    head.set_tensor("qweight", embedding.qweight)
    head.set_tensor("scales", embedding.scales)
    head.tensor_sharers = [embedding]
    x = torch.randn(3, hidden)
    head(x)
    assert embedding.layout == "lanes" and embedding.qweight is head.qweight
    assert torch.equal(embedding.qweight, packing.pack_w8_lanes(rows_layout))
    assert torch.equal(embedding(ids), looked_up)
    assert torch.equal(embedding.stored_codes(), rows_layout)

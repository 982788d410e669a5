"""A w4 / MixLLM Linear on AVX-512 VNNI: the kernel repacks the w4 tensors into the lanes layout
and the layer holds the kernel's tensors instead of its own (the weights stay in memory once),
while everything that reads the codes back still sees the format's weights."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import cpu as cpu_kernels
from fitserve.layers.linear import Linear
from fitserve.layers.weight_formats.mixllm import MixedFormat
from fitserve.layers.weight_formats.w4 import W4Format
from fitserve.quant import packing

kernels = cpu_kernels.get()
pytestmark = pytest.mark.skipif(kernels is None or not kernels.has_avx512_vnni(),
                                reason="the lanes layout is AVX-512 VNNI's")


def quantized_linear(weight_format, weight: torch.Tensor) -> Linear:
    layer = Linear(weight.shape[1], weight.shape[0], True, cpu_kernels.MatmulScratch(), weight_format)
    torch.nn.init.normal_(layer.bias)
    weight_format.quantize(layer, weight, "model.layers.0.mlp.down_proj")
    return layer


@pytest.mark.parametrize("fmt", ["w4", "mixllm"])
def test_layer_holds_the_kernels_lanes_tensors_and_reads_back_the_format(fmt):
    weight = torch.randn(37, 256)
    weight_format = W4Format(64) if fmt == "w4" else MixedFormat({"model.layers.0.mlp.down_proj": [3, 20]}, 64)
    layer = quantized_linear(weight_format, weight)
    before = layer.dequantized_weight()
    rows_layout = (layer.qweight, layer.scales, layer.zeros)
    x = torch.randn(5, 256)
    out = layer(x)
    assert layer.w4_layout == "lanes" and layer.cpu_kernel_object.part_layouts()[0] == "lanes"
    assert torch.equal(layer.qweight, packing.pack_w4_lanes(*rows_layout, 64)[0])
    assert layer.qweight.data_ptr() != rows_layout[0].data_ptr()
    assert torch.equal(layer.dequantized_weight(), before)
    assert layer.stored_bytes() == sum(t.numel() * t.element_size() for t in layer.weight_format.tensors(layer).values())
    # Rebuilt from the lanes tensors it holds (as after invalidate): the same kernel, same result.
    held = layer.qweight.data_ptr()
    layer.invalidate()
    assert torch.equal(layer(x), out)
    assert layer.qweight.data_ptr() == held and layer.w4_layout == "lanes"
    # New tensors in the format's layout start over from the row layout.
    layer.weight_format.quantize(layer, weight, "model.layers.0.mlp.down_proj")
    assert layer.w4_layout == "rows"
    assert torch.equal(layer.dequantized_weight(), before)

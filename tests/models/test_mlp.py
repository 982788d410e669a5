"""The MLP of a many-token step (a prefill) computes in the model's shared scratch.

Its float32 gate/up product and activation are tens of MB for a long prompt; fresh tensors
of that size are page-faulted in on every layer. Keeping them in the scratch must not change
a bit of the result: float32 parity with transformers depends on torch's own SiLU and matmul.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fitserve.models.loader import load_model

CPU = torch.device("cpu")


def reference_mlp(mlp, x: torch.Tensor) -> torch.Tensor:
    gate, up = F.linear(x, mlp.gate_up_proj.weight, mlp.gate_up_proj.bias).split(mlp.intermediate_size, dim=-1)
    return F.linear(F.silu(gate) * up, mlp.down_proj.weight, mlp.down_proj.bias)


def test_float32_prefill_mlp_is_bit_identical_and_reuses_the_scratch(make_checkpoint):
    model, config = load_model(make_checkpoint("llama2"), torch.float32, CPU, "torch")
    generator = torch.Generator().manual_seed(3)
    first_layer, second_layer = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert first_layer.scratch is second_layer.scratch  # one scratch for the whole model
    with torch.no_grad():
        x = torch.randn(37, config.hidden_size, generator=generator)
        first = first_layer(x)
        activation = first_layer.scratch.buffer("activation", (1,), CPU).data_ptr()
        product = first_layer.scratch.buffer("product", (1,), CPU).data_ptr()
        second = second_layer(x)
        assert torch.equal(first, reference_mlp(first_layer, x))
        assert torch.equal(second, reference_mlp(second_layer, x))
        assert first_layer.scratch.buffer("activation", (1,), CPU).data_ptr() == activation
        assert first_layer.scratch.buffer("product", (1,), CPU).data_ptr() == product
        assert not torch.equal(first, second)  # the second layer's result is its own, not a view of the first's

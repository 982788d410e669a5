"""The rotary table the fused CPU decode step reads must hold what the Python path computes."""

from __future__ import annotations

import pytest
import torch

from fitserve.models.rope import RotaryEmbedding

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("head_dim", "theta", "scaling"), [(64, 1_000_000.0, None), (128, 500_000.0, LLAMA3_SCALING)])
def test_table_rows_equal_single_position_forward(dtype, head_dim, theta, scaling):
    rope = RotaryEmbedding(head_dim, theta, scaling)
    cos, sin = rope.table(dtype, 10)
    assert cos.shape == sin.shape == (4096, head_dim) and cos.dtype == dtype
    first_rows = cos[:300].clone()
    # Growing past the first chunk keeps the rows it had and adds exact new ones.
    cos, sin = rope.table(dtype, 5000)
    assert cos.shape[0] == 8192 and torch.equal(cos[:300], first_rows)
    assert rope.table(dtype, 100)[0] is cos  # no recomputation while it covers the positions
    for position in [0, 1, 127, 128, 4095, 4096, 4097, 5000, 8191]:
        expected_cos, expected_sin = rope(torch.tensor([position]), dtype)
        assert torch.equal(cos[position : position + 1], expected_cos), position
        assert torch.equal(sin[position : position + 1], expected_sin), position


def test_reset_inv_freq_drops_the_tables():
    rope = RotaryEmbedding(64, 10_000.0, None)
    cos, _ = rope.table(torch.float32, 1)
    rope.reset_inv_freq()
    assert rope.table(torch.float32, 1)[0] is not cos

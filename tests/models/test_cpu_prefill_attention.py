"""The bf16 prefill attention kernel of this CPU (AVX512-BF16 or AVX2; none on AMX CPUs)
inside the model agrees with torch's fused attention, for a whole prompt and for a chunk
after a cached prefix."""

from __future__ import annotations

import pytest
import torch

from fitserve.kernels import cpu
from fitserve.models.loader import load_model

from tests.models.conftest import PagedKVCache

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(
    cpu.prefill_attention_kernel(torch.bfloat16, 64, CPU) is None,
    reason="no bf16 prefill attention kernel applies on this CPU (AMX, or no AVX2)")


@pytest.mark.parametrize(("architecture", "overrides"), [("qwen3_qk_norm", {}), ("llama2", {"head_dim": 64})])
def test_prefill_with_the_kernel_matches_torch_attention(architecture, overrides, make_checkpoint, token_ids, monkeypatch):
    checkpoint = make_checkpoint(architecture, dtype="bfloat16", **overrides)
    model, config = load_model(checkpoint, torch.bfloat16, CPU, "torch")
    prompt = token_ids(45, 0)
    calls = []
    kernel = cpu.prefill_attention_kernel(torch.bfloat16, config.head_dim, CPU)

    def spy(*args):
        calls.append(args[0].shape[0])
        return kernel(*args)

    def run(chosen_kernel) -> torch.Tensor:
        monkeypatch.setattr(cpu, "prefill_attention_kernel", lambda *args: chosen_kernel)
        cache = PagedKVCache(config.num_hidden_layers, config.num_key_value_heads, config.head_dim,
                             dtype=torch.bfloat16)
        sequence = cache.new_sequence(prompt)
        logits = []
        with torch.no_grad():
            for chunk in (30, 15):  # a prefill, then a chunk that attends over the cached 30
                input_ids, positions, metadata = cache.step([(sequence, chunk)])
                logits.append(model.compute_logits(model(input_ids, positions, cache.kv_caches, metadata)))
        return torch.cat(logits)

    ours = run(spy)
    assert calls == [30] * config.num_hidden_layers + [15] * config.num_hidden_layers
    reference = run(None)
    torch.testing.assert_close(ours, reference, atol=0.05, rtol=0.05)
    assert (ours.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9

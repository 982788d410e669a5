"""fitserve's decoder gives transformers' logits, for every architecture and batch shape.

Users rely on this: greedy decoding in float32 must pick the same tokens as transformers,
whether a sequence is prefilled at once, in chunks, or decoded one token at a time next to
other sequences in a shared paged KV cache. The mixed-batch and generation tests also run the
GPU path (Triton attention and the fused Triton per-layer ops), in Triton's interpreter where
there is no GPU.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from fitserve.models.loader import load_model

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CPU = torch.device("cpu")


def load_float32(checkpoint, backend: str):
    """(model, config, device): the torch path on the CPU, or the Triton path on the GPU (in
    Triton's interpreter on the CPU where there is none)."""
    if backend == "torch":
        return (*load_model(checkpoint, torch.float32, CPU, "torch"), CPU)
    from fitserve.attention import triton_paged

    return (*load_model(checkpoint, torch.float32, DEVICE, triton_paged), DEVICE)


BACKENDS = pytest.mark.parametrize("backend", ["torch", "triton"])


def assert_logits_match(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def hf_logits(hf_model: torch.nn.Module, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def test_single_prefill_matches_transformers(variant, make_checkpoint, paged_cache_for, token_ids):
    checkpoint = make_checkpoint(variant)
    model, config = load_model(checkpoint, torch.float32, CPU, "torch")
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()

    prompt = token_ids(13, 0)
    cache = paged_cache_for(config)
    sequence = cache.new_sequence(prompt)
    input_ids, positions, metadata = cache.step([(sequence, len(prompt))])
    with torch.no_grad():
        logits = model.compute_logits(model(input_ids, positions, cache.kv_caches, metadata))

    assert logits.dtype == torch.float32
    assert logits.shape == (len(prompt), config.vocab_size)
    assert_logits_match(logits, hf_logits(hf_model, prompt))


@BACKENDS
def test_mixed_batch_matches_transformers(variant, backend, make_checkpoint, paged_cache_for, token_ids):
    """One step holding a fresh prefill, a chunked prefill and two decodes, then a decode-only
    step, over scattered blocks: each row equals transformers on that sequence alone."""
    checkpoint = make_checkpoint(variant)
    model, config, device = load_float32(checkpoint, backend)
    # The Triton backend brings the fused Triton norms, rotary and SiLU·up with it.
    assert (model.model.layers[0].mlp.triton_ops is not None) == (backend == "triton")
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    cache = paged_cache_for(config, device=device)

    fresh = cache.new_sequence(token_ids(7, 1))
    chunked = cache.new_sequence(token_ids(9, 2))
    decode_short = cache.new_sequence(token_ids(8, 3))
    decode_long = cache.new_sequence(token_ids(12, 4))

    def run(scheduled):
        input_ids, positions, metadata = cache.step(scheduled)
        with torch.no_grad():
            return model.compute_logits(model(input_ids, positions, cache.kv_caches, metadata)).cpu()

    # Earlier steps fill the cache: the chunked prompt's first 5 tokens, the decoders' prompts.
    run([(chunked, 5), (decode_short, 6), (decode_long, 10)])

    mixed = run([(fresh, 7), (chunked, 4), (decode_short, 1), (decode_long, 1)])
    assert mixed.shape == (7 + 4 + 1 + 1, config.vocab_size)
    assert_logits_match(mixed[0:7], hf_logits(hf_model, fresh.token_ids))
    assert_logits_match(mixed[7:11], hf_logits(hf_model, chunked.token_ids)[5:9])
    assert_logits_match(mixed[11:12], hf_logits(hf_model, decode_short.token_ids[:7])[6:7])
    assert_logits_match(mixed[12:13], hf_logits(hf_model, decode_long.token_ids[:11])[10:11])

    decode_only = run([(decode_short, 1), (decode_long, 1)])
    assert_logits_match(decode_only[0:1], hf_logits(hf_model, decode_short.token_ids)[7:8])
    assert_logits_match(decode_only[1:2], hf_logits(hf_model, decode_long.token_ids)[11:12])


@BACKENDS
@pytest.mark.parametrize("architecture", ["llama3_rope_scaling", "qwen3_qk_norm"])
def test_greedy_generation_is_token_identical(architecture, backend, make_checkpoint, paged_cache_for, token_ids):
    """Twelve greedy tokens through prefill + decode steps equal transformers' generate()."""
    checkpoint = make_checkpoint(architecture)
    model, config, device = load_float32(checkpoint, backend)
    hf_model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    prompt = token_ids(6, 5)
    num_new_tokens = 12
    cache = paged_cache_for(config, device=device)
    sequence = cache.new_sequence(prompt + [0] * num_new_tokens)

    generated: list[int] = []
    num_new = len(prompt)
    for step in range(num_new_tokens):
        input_ids, positions, metadata = cache.step([(sequence, num_new)])
        with torch.no_grad():
            hidden = model(input_ids, positions, cache.kv_caches, metadata)
            next_token = int(model.compute_logits(hidden[-1:]).argmax(-1))
        generated.append(next_token)
        sequence.token_ids[len(prompt) + step] = next_token
        num_new = 1

    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=num_new_tokens, do_sample=False,
            min_new_tokens=num_new_tokens, pad_token_id=0,
        )[0, len(prompt):].tolist()
    assert generated == expected

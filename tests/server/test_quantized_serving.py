"""A quantized model behind the OpenAI server: same answers as the offline API on the same
directory, streamed and not, and no KV blocks left behind."""

from __future__ import annotations

from pathlib import Path

import openai

from fitserve import LLM, SamplingParams
from fitserve.quant.quantize import quantize_model
from tests.server.conftest import API_KEY, KV_CACHE_MEMORY, MODEL_NAME, serve_in_thread


def test_quantized_model_serves_the_offline_apis_answers(tiny_model_dir: Path, tmp_path: Path) -> None:
    quantized = tmp_path / "w4"
    quantize_model(tiny_model_dir, quantized, "w4", group_size=32, progress=False)
    prompt = "alpha beta gamma"
    expected = LLM(str(quantized), dtype="float32", device="cpu", kv_cache_memory=KV_CACHE_MEMORY).generate(
        [prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0].text
    with serve_in_thread(quantized) as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY)
        answer = client.completions.create(model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
        streamed = "".join(chunk.choices[0].text for chunk in client.completions.create(
            model=MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, stream=True,
            extra_body={"ignore_eos": True}))
        stats = server.wait_until_idle()
    assert answer.choices[0].text == streamed == expected
    assert stats.num_free_blocks == stats.num_total_blocks

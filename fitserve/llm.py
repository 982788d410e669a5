"""`LLM`: offline batch generation with vLLM's call shape (`LLM(model).generate(prompts, params)`)."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm import tqdm

from fitserve.config import EngineArgs
from fitserve.engine.engine import LLMEngine
from fitserve.models.elastic_weights import WeightMemoryInfo
from fitserve.outputs import RequestOutput
from fitserve.sampling_params import SamplingParams

Prompt = str | list[int] | dict


class LLM:
    """Load a model once, then generate for many prompts at a time with continuous batching.

    Keyword arguments are `EngineArgs` fields (dtype, kv_cache_memory, max_num_seqs, ...).
    """

    def __init__(self, model: str | None = None, **engine_kwargs) -> None:
        self.engine = LLMEngine(EngineArgs(model=model, **engine_kwargs))
        self._request_counter = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def set_weight_memory(self, budget: str | int) -> WeightMemoryInfo:
        """Move a BitStack model to `budget` ("300MiB", bytes): the most valuable blocks that
        fit stay loaded, memory of the others is given back. ConfigError names the valid range."""
        return self.engine.set_weight_memory(budget)

    def weight_memory_info(self) -> WeightMemoryInfo | None:
        """Loaded bytes, budget range and blocks of a BitStack model (None for other formats)."""
        return self.engine.weight_memory_info()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; results come back in prompt order, all finished.

        A prompt is a string, a list of token ids, or {"prompt_token_ids": [...]}. One
        `SamplingParams` applies to all prompts, or pass one per prompt. `n > 1` runs n
        sequences per prompt (seeds seed, seed+1, ... when a seed is given). `priority`, one
        integer per prompt, orders the queue under `scheduling_policy="priority"` (lower
        first), as in vLLM.
        """
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(
                    f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass one or one per prompt"
                )

        priorities = [0] * len(prompts) if priority is None else list(priority)
        if len(priorities) != len(prompts):
            raise ValueError(f"got {len(priorities)} priorities for {len(prompts)} prompts; pass one per prompt")

        # request id -> (prompt index, sequence index)
        owners: dict[str, tuple[int, int]] = {}
        for prompt_index, (prompt, params) in enumerate(zip(prompts, params_list)):
            for sequence_index in range(params.n):
                request_id = str(next(self._request_counter))
                self.engine.add_request(
                    request_id, prompt, _single_sequence(params, sequence_index), final_output_only=True,
                    priority=priorities[prompt_index],
                )
                owners[request_id] = (prompt_index, sequence_index)

        finished: dict[str, RequestOutput] = {}
        progress = tqdm(total=len(owners), desc="generating", disable=not use_tqdm)
        while len(finished) < len(owners):
            for output in self.engine.step():
                if output.finished and output.request_id in owners:
                    finished[output.request_id] = output
                    progress.update(1)
        progress.close()
        return _merge_sequences(prompts, params_list, owners, finished)

    def chat(
        self,
        messages: list[dict[str, str]] | list[list[dict[str, str]]],
        sampling_params: SamplingParams | None = None,
    ) -> list[RequestOutput]:
        """Generate replies to conversations, formatted with the tokenizer's chat template."""
        tokenizer = self.engine.tokenizer
        if tokenizer is None:
            raise ValueError("this model has no tokenizer, so it has no chat template")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [
            {"prompt_token_ids": list(_token_ids(tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True)))}
            for c in conversations  # type: ignore[union-attr]
        ]
        return self.generate(prompts, sampling_params)


def _token_ids(encoded) -> list[int]:
    """apply_chat_template returns a list or a BatchEncoding depending on transformers' version."""
    if isinstance(encoded, dict) or hasattr(encoded, "input_ids"):
        return list(encoded["input_ids"])
    return list(encoded)


def _single_sequence(params: SamplingParams, sequence_index: int) -> SamplingParams:
    if params.n == 1:
        return params
    seed = None if params.seed is None else params.seed + sequence_index
    return dataclasses.replace(params, n=1, seed=seed)


def _merge_sequences(
    prompts: list[Prompt],
    params_list: list[SamplingParams],
    owners: dict[str, tuple[int, int]],
    finished: dict[str, RequestOutput],
) -> list[RequestOutput]:
    """One RequestOutput per prompt, with its n sequences as outputs[0..n-1]."""
    merged: list[RequestOutput | None] = [None] * len(prompts)
    for request_id, (prompt_index, sequence_index) in sorted(owners.items(), key=lambda item: item[1]):
        output = finished[request_id]
        completion = output.outputs[0]
        completion.index = sequence_index
        if merged[prompt_index] is None:
            output.request_id = str(prompt_index)
            merged[prompt_index] = output
        else:
            merged[prompt_index].outputs.append(completion)  # type: ignore[union-attr]
    return merged  # type: ignore[return-value]

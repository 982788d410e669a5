"""The synchronous engine: requests in, one scheduled model step at a time, outputs out.

`step()` is the whole loop body: the scheduler decides, the runner computes, and `_update`
appends tokens, detokenizes, checks stop conditions and frees what finished. The server
drives the same API from a background thread (see async_engine.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fitserve.attention import get_attention_backend, is_triton_backend
from fitserve.bench.slo import parse_slo
from fitserve.config import ConfigError, EngineArgs, parse_size, resolve_device, resolve_dtype
from fitserve.engine.decode_graphs import DecodeGraphs
from fitserve.engine.detokenizer import IncrementalDetokenizer
from fitserve.engine.kv_cache import KVCacheManager
from fitserve.engine.policy import make_policy
from fitserve.engine.policy_late_last import LateLastPolicy
from fitserve.engine.request import Request, RequestStatus
from fitserve.engine.runner import ModelRunner, RunnerOutput, allocate_kv_cache, kv_cache_bytes_per_block
from fitserve.engine.sampler import Sampler
from fitserve.engine.scheduler import Scheduler, SchedulerOutput
from fitserve.engine.slo_budget import SloBudgetController
from fitserve.engine.swap import SwapSpace
from fitserve.engine.weight_resize import ResizeTicket, WeightResizer
from fitserve.engine.tokenizer import load_tokenizer
from fitserve.kernels import cpu as cpu_kernels
from fitserve.models.config import load_model_config
from fitserve.models.loader import load_model
from fitserve.models.elastic_weights import WeightMemoryInfo
from fitserve.models.weight_memory import projection_bits_per_weight, weight_memory_bytes
from fitserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from fitserve.sampling_params import SamplingParams

logger = logging.getLogger("fitserve")

DEFAULT_CPU_KV_CACHE_BYTES = 1 << 30


class PromptTooLongError(ValueError):
    """The prompt (plus the requested output) does not fit the context; the message says the limits."""


@dataclass
class EngineStats:
    """A snapshot for /metrics and benchmarks."""

    num_running: int
    num_waiting: int
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions_total: int
    num_prefix_cache_hit_tokens_total: int
    num_prompt_tokens_total: int
    num_generated_tokens_total: int
    num_swap_outs_total: int = 0
    num_swap_ins_total: int = 0
    num_swap_bytes_total: int = 0
    """Bytes copied between device and host KV, both directions."""
    num_computed_tokens_total: int = 0
    """Tokens the model computed K/V for (prompts, decode, and recomputation after preemption)."""
    num_recomputed_tokens_total: int = 0
    """Of those, tokens computed again after a recompute preemption lost their K/V (what swap
    preemption saves; a preempted request's blocks that the prefix cache still holds are not
    recomputed)."""
    num_host_prefix_hit_tokens_total: int = 0
    """Prompt tokens whose K/V was copied in from the host tier's prefix cache instead of
    being computed."""
    step_token_budget: int = 0
    """The step token budget in use (moved by the SLO loop when --slo is set)."""
    running_requests_cap: int = 0
    """The most requests allowed to run at once: max_num_seqs, or lower while the SLO loop
    holds requests back to shorten the running ones' steps."""
    slo_attainment: float | None = None
    """With --slo: share of the latest window's finished requests that met every target."""
    num_late_waiting: int | None = None
    """With --slo: waiting requests found past their TTFT target, queued behind on-time ones."""
    weight_memory_bytes: int | None = None
    """BitStack models: bytes of all weights now in memory (None for other formats)."""
    weight_memory_budget_bytes: int | None = None
    """BitStack models: the budget the loaded weights were chosen for (or are moving to)."""

    @property
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks in use by running requests (0..1)."""
        return 1.0 - self.num_free_blocks / max(1, self.num_total_blocks)


class LLMEngine:
    """Owns the model runner, the KV-cache manager and the scheduler; not thread-safe."""

    def __init__(self, args: EngineArgs) -> None:
        self.args = args
        self.device = resolve_device(args.device)
        if args.num_threads:
            torch.set_num_threads(args.num_threads)
        model_dir = args.model_dir
        checkpoint_config = load_model_config(model_dir)
        self.dtype = resolve_dtype(args.dtype, checkpoint_config.checkpoint_dtype, self.device)
        attention_backend = get_attention_backend(args.attention_backend, self.device)
        weight_memory = parse_size(args.weight_memory) if args.weight_memory is not None else None
        if self.device.type == "cpu":
            # The compiled CPU kernels are built on first use, which for dense weights would be
            # the first request: a fresh machine's first build takes a minute, during which a
            # server that already said it was listening would answer nothing. Build them here.
            cpu_kernels.get()
        self.model, self.model_config = load_model(model_dir, self.dtype, self.device, attention_backend,
                                                   quantization=args.quantization,
                                                   group_size=args.quantization_group_size,
                                                   weight_memory=weight_memory)
        elastic = self.model.elastic_weights
        self.weight_resizer = WeightResizer(elastic) if elastic is not None else None
        """BitStack models: moves the weights to another memory budget between steps."""
        self.tokenizer = load_tokenizer(args.tokenizer or model_dir, required=args.tokenizer is not None)
        eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos_token_ids.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = tuple(sorted(eos_token_ids))

        config = self.model_config
        self.block_size = args.block_size
        bytes_per_block = kv_cache_bytes_per_block(
            config.num_hidden_layers, config.num_key_value_heads, config.head_dim, self.block_size, self.dtype,
            args.kv_cache_dtype,
        )
        kv_bytes = self._kv_cache_budget()
        # Captured graphs would keep multiplying by the blocks loaded at capture time, so a
        # model whose weights can be resized decodes eagerly.
        use_cuda_graphs = (self.device.type == "cuda" and not args.enforce_eager
                           and is_triton_backend(attention_backend) and self.weight_resizer is None)
        if self.device.type == "cuda" and self.weight_resizer is not None and not args.enforce_eager:
            logger.info("bitstack weights can be resized while serving: decode steps run without CUDA graphs")
        # CUDA graphs pad decode batches; the padding rows write into one spare block.
        num_allocated_blocks = kv_bytes // bytes_per_block
        self.num_kv_blocks = num_allocated_blocks - (1 if use_cuda_graphs else 0)
        if self.num_kv_blocks < 1:
            raise ConfigError(
                f"the KV-cache budget ({kv_bytes} bytes) is smaller than one block "
                f"({bytes_per_block} bytes); raise --kv-cache-memory"
            )
        self.kv_capacity_tokens = self.num_kv_blocks * self.block_size
        self.max_model_len = self._resolve_max_model_len()
        kv_caches = allocate_kv_cache(
            config.num_hidden_layers, num_allocated_blocks, self.block_size,
            config.num_key_value_heads, config.head_dim, self.dtype, self.device, args.kv_cache_dtype,
        )
        self.kv_cache_bytes = self.num_kv_blocks * bytes_per_block
        num_host_blocks = 0
        if args.preemption_mode == "swap":
            num_host_blocks = parse_size(args.swap_space) // bytes_per_block
            if num_host_blocks < 1:
                raise ConfigError(f"--swap-space {args.swap_space} is smaller than one KV block "
                                  f"({bytes_per_block} bytes)")
        self.kv_cache = KVCacheManager(self.num_kv_blocks, self.block_size, args.enable_prefix_caching,
                                       num_host_blocks, args.host_prefix_cache)
        policy = make_policy(args.scheduling_policy, args.vtc_prompt_token_weight,
                             args.vtc_output_token_weight, args.client_weights)
        slo = parse_slo(args.slo) if args.slo is not None else None
        self._late_last: LateLastPolicy | None = None
        if slo is not None:
            # Under --slo, requests past their TTFT target yield to those that can still meet it.
            policy = self._late_last = LateLastPolicy(
                policy, slo.ttft_ms / 1e3 if slo.ttft_ms is not None else math.inf)
        self.scheduler = Scheduler(
            self.kv_cache, args.max_num_batched_tokens, args.max_num_seqs, args.enable_chunked_prefill, policy,
            args.preemption_mode,
        )
        self.sampler = Sampler(config.vocab_size, self.device, seed=args.seed)
        decode_graphs = None
        if use_cuda_graphs:
            decode_graphs = DecodeGraphs(
                self.model, kv_caches, self.block_size, min(self.max_model_len, args.max_seq_len_to_capture),
                args.max_num_seqs,
                padding_block=num_allocated_blocks - 1, device=self.device, use_cuda_graphs=True,
            )
            decode_graphs.capture()
        self.runner = ModelRunner(self.model, kv_caches, self.block_size, self.device, self.sampler, decode_graphs)
        self.swap_space = SwapSpace(kv_caches, num_host_blocks) if num_host_blocks else None
        self.slo_controller = None
        if slo is not None:
            self.slo_controller = SloBudgetController(
                slo, budget=args.max_num_batched_tokens, min_budget=min(64, args.max_num_batched_tokens),
                max_budget=4 * args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs)

        self._requests: dict[str, Request] = {}
        self._detokenizers: dict[str, IncrementalDetokenizer] = {}
        self._pending_outputs: list[RequestOutput] = []
        self._num_prompt_tokens_total = 0
        self._num_generated_tokens_total = 0
        self._num_cached_tokens_total = 0
        logger.info(self.startup_summary())

    # ----------------------------------------------------------------------------- set-up

    def _kv_cache_budget(self) -> int:
        if self.args.kv_cache_memory is not None:
            return parse_size(self.args.kv_cache_memory)
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
            used = total - free
            budget = int(total * self.args.gpu_memory_utilization) - used
            if budget <= 0:
                raise ConfigError(
                    f"no GPU memory left for the KV cache: {used / 2**30:.1f} GiB of "
                    f"{total / 2**30:.1f} GiB in use; raise --gpu-memory-utilization or pass --kv-cache-memory"
                )
            return budget
        return DEFAULT_CPU_KV_CACHE_BYTES

    def _resolve_max_model_len(self) -> int:
        model_limit = self.model_config.max_position_embeddings
        limit_name = "max_position_embeddings"
        # Attention here always sees the whole context, so a sliding-window model (Mistral
        # v0.1) is exact only up to its window.
        sliding_window = self.model_config.sliding_window
        if sliding_window and sliding_window < model_limit:
            model_limit, limit_name = sliding_window, "sliding_window"
        requested = self.args.max_model_len
        if requested is not None and requested > model_limit:
            raise ConfigError(
                f"--max-model-len {requested} exceeds the model's {limit_name} ({model_limit})"
            )
        max_model_len = requested or model_limit
        if max_model_len > self.kv_capacity_tokens:
            if requested is not None:
                raise ConfigError(
                    f"--max-model-len {requested} needs more KV cache than the budget holds "
                    f"({self.kv_capacity_tokens} tokens); raise --kv-cache-memory or lower --max-model-len"
                )
            logger.info(
                "context length limited to the KV capacity: %d tokens (model allows %d)",
                self.kv_capacity_tokens, model_limit,
            )
            max_model_len = self.kv_capacity_tokens
        return max_model_len

    def weights_summary(self) -> str:
        """Weight format and memory, e.g. "weights w4 (4.19 bits/weight in projections), 5.4 MiB"."""
        plan = self.model.plan
        total = weight_memory_bytes(self.model)
        elastic = self.model.elastic_weights
        if elastic is not None:
            return (f"weights {plan.method} ({projection_bits_per_weight(self.model):.2f} bits/weight in projections), "
                    f"{elastic.summary(plan.perplexity_curve)}")
        if plan.is_dense:
            return f"weights dense, {total / 2**20:.1f} MiB"
        return (f"weights {plan.method} ({projection_bits_per_weight(self.model):.2f} bits/weight in projections), "
                f"{total / 2**20:.1f} MiB")

    @property
    def kv_cache_dtype_name(self) -> str:
        """What the KV cache stores: "int8" or the model dtype's name (for the banner)."""
        if self.args.kv_cache_dtype == "int8":
            return "int8"
        return str(self.dtype).removeprefix("torch.")

    def startup_summary(self) -> str:
        return (
            f"model {self.args.model_dir} ({self.model_config.architecture}), dtype "
            f"{str(self.dtype).removeprefix('torch.')}, device {self.device}; {self.weights_summary()}; KV cache "
            f"{self.kv_cache_dtype_name} {self.num_kv_blocks} blocks x {self.block_size} tokens = {self.kv_capacity_tokens} tokens "
            f"({self.kv_cache_bytes / 2**20:.1f} MiB); max model len {self.max_model_len}"
        )

    # ----------------------------------------------------------------------------- weight memory

    def _resizer(self) -> WeightResizer:
        if self.weight_resizer is None:
            raise ConfigError(f"weight memory can only change for a BitStack model (made with `fitserve quantize "
                              f"MODEL --method bitstack --out DIR`); this model holds {self.model.plan.method} "
                              "weights")
        return self.weight_resizer

    def weight_memory_info(self) -> WeightMemoryInfo | None:
        """Loaded bytes, the valid budget range and blocks of a BitStack model (None otherwise)."""
        return self.weight_resizer.info() if self.weight_resizer is not None else None

    def request_weight_memory(self, budget: str | int) -> ResizeTicket:
        """Start moving the weights to `budget` ("300MiB", bytes) without blocking: the blocks
        are read in the background and the switch happens between two `step()` calls (the
        ticket is then done). Raises ConfigError (the valid range in its message) for a bad
        budget, changing nothing. Safe to call from another thread than the one stepping."""
        return self._resizer().request(parse_size(budget))

    def set_weight_memory(self, budget: str | int) -> WeightMemoryInfo:
        """Move the weights to `budget` now and return where they stand. For callers that step
        the engine themselves (`LLM`); the server uses `request_weight_memory`."""
        ticket = self._resizer().request(parse_size(budget))
        self.finish_weight_resize()
        if ticket.error is not None:
            raise ticket.error
        assert ticket.info is not None
        return ticket.info

    def finish_weight_resize(self) -> bool:
        """Block until a requested resize is read, then switch (only from the thread that
        steps the engine). True when the weights changed."""
        if self.weight_resizer is None or not self.weight_resizer.wait():
            return False
        self._weights_changed()
        return True

    def poll_weight_resize(self) -> bool:
        """Switch to a requested budget whose blocks are read (`step` does this first; an idle
        loop calls it itself). True when the weights changed."""
        if self.weight_resizer is None or not self.weight_resizer.poll():
            return False
        self._weights_changed()
        return True

    @property
    def resize_pending(self) -> bool:
        return self.weight_resizer is not None and self.weight_resizer.pending

    def _weights_changed(self) -> None:
        # KV computed with the old weights stays with the requests that own it (they keep
        # going), but later prompts must not reuse it from the prefix cache.
        self.kv_cache.new_weights_epoch()

    # ----------------------------------------------------------------------------- requests

    def tokenize_prompt(self, prompt: str | list[int] | dict) -> tuple[str | None, list[int]]:
        """(prompt text or None, token ids) from any accepted prompt form."""
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                prompt = list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: send prompt_token_ids instead of text")
            return prompt, list(self.tokenizer.encode(prompt))
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt must be a string, a list of token ids, or a dict with one of them")
        vocab_size = self.model_config.vocab_size
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
        return None, list(prompt)

    def add_request(self, request_id: str, prompt: str | list[int] | dict,
                    sampling_params: SamplingParams | None = None, **options: Any) -> None:
        """Queue a prompt. Raises ValueError (PromptTooLongError for length) for bad input.

        `options` are `prepare_request`'s: `arrival_time`, `client_id`, and `final_output_only`
        (`step` reports the request only when it finishes)."""
        self.enqueue_request(self.prepare_request(request_id, prompt, sampling_params, **options))

    def prepare_request(
        self,
        request_id: str,
        prompt: str | list[int] | dict,
        sampling_params: SamplingParams | None = None,
        arrival_time: float | None = None,
        client_id: str | None = None,
        final_output_only: bool = False,
        priority: int = 0,
    ) -> Request:
        """Validate and tokenize a prompt into a `Request` without queueing it (`enqueue_request`
        does that), so a caller can accept a request at once and admit it later. `client_id` is
        who the `vtc` policy shares service between; `priority` orders the `priority` policy's
        queue (lower first); other policies ignore them."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority must be an integer (got {priority!r})")
        params = sampling_params or SamplingParams()
        if params.n != 1:
            raise ValueError("LLMEngine runs one sequence per request; fan out n > 1 as separate requests")
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        vocab_size = self.model_config.vocab_size
        bad_stop = [t for t in params.stop_token_ids if not 0 <= t < vocab_size]  # type: ignore[union-attr]
        if bad_stop:
            raise ValueError(f"stop token id {bad_stop[0]} is outside the vocabulary (0..{vocab_size - 1})")
        prompt_text, token_ids = self.tokenize_prompt(prompt)
        if not token_ids:
            raise ValueError("the prompt is empty")
        self._check_length(len(token_ids), params)
        request = Request(
            request_id=request_id,
            prompt_token_ids=token_ids,
            sampling_params=params,
            prompt=prompt_text,
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.max_model_len,
            client_id=client_id,
            arrival_time=arrival_time if arrival_time is not None else time.time(),
            final_output_only=final_output_only,
            priority=priority,
        )
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        return request

    def enqueue_request(self, request: Request) -> None:
        """Hand a request from `prepare_request` to the scheduler."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self._requests[request.request_id] = request
        self._detokenizers[request.request_id] = IncrementalDetokenizer(
            self.tokenizer, request.prompt_token_ids, request.sampling_params
        ) if self.tokenizer is not None else None  # type: ignore[assignment]
        self._num_prompt_tokens_total += len(request.prompt_token_ids)
        self.scheduler.add_request(request)

    def _check_length(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        limit = self.max_model_len
        requested = num_prompt_tokens + (params.max_tokens or 1)
        if num_prompt_tokens >= limit or requested > limit:
            raise PromptTooLongError(
                f"this model's maximum context length is {limit} tokens, but the request needs "
                f"{requested} ({num_prompt_tokens} in the prompt, {params.max_tokens or 1} to generate); "
                "shorten the prompt or lower max_tokens"
            )
        if not self.args.enable_chunked_prefill and num_prompt_tokens > self.args.max_num_batched_tokens:
            raise PromptTooLongError(
                f"the prompt has {num_prompt_tokens} tokens but --max-num-batched-tokens is "
                f"{self.args.max_num_batched_tokens} and chunked prefill is off; enable chunked prefill "
                "or raise the budget"
            )

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests now and free their blocks; each yields a final output at the next step."""
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None or request.is_finished:
                continue
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            self._pending_outputs.append(self._make_output(request))

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or bool(self._pending_outputs)

    def get_stats(self) -> EngineStats:
        return EngineStats(
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            num_free_blocks=self.kv_cache.num_free_blocks,
            num_total_blocks=self.kv_cache.num_blocks,
            num_preemptions_total=self.scheduler.num_preemptions_total,
            num_prefix_cache_hit_tokens_total=self._num_cached_tokens_total,
            num_prompt_tokens_total=self._num_prompt_tokens_total,
            num_generated_tokens_total=self._num_generated_tokens_total,
            step_token_budget=self.scheduler.max_num_batched_tokens,
            running_requests_cap=self.scheduler.max_num_seqs,
            slo_attainment=self.slo_controller.attainment if self.slo_controller is not None else None,
            num_late_waiting=self._late_last.num_late if self._late_last is not None else None,
            num_swap_outs_total=self.scheduler.num_swap_outs_total,
            num_swap_ins_total=self.scheduler.num_swap_ins_total,
            num_computed_tokens_total=self.scheduler.num_computed_tokens_total,
            num_recomputed_tokens_total=self.scheduler.num_recomputed_tokens_total,
            num_host_prefix_hit_tokens_total=self.kv_cache.num_host_hit_tokens_total,
            num_swap_bytes_total=(self.swap_space.num_bytes_out + self.swap_space.num_bytes_in
                                  if self.swap_space is not None else 0),
            **self._weight_memory_stats(),
        )

    def _weight_memory_stats(self) -> dict[str, int]:
        info = self.weight_memory_info()
        if info is None:
            return {}
        budget = info.pending_budget_bytes if info.pending_budget_bytes is not None else info.budget_bytes
        return {"weight_memory_bytes": info.current_bytes, "weight_memory_budget_bytes": budget}

    # ----------------------------------------------------------------------------- stepping

    def _running_tpots_ms(self) -> list[float]:
        """Each running request's TPOT so far, in ms (whether the running requests are on
        course to miss TPOT; asked by the SLO loop only while steps are long)."""
        now = time.time()
        return [(now - request.metrics.first_token_time) * 1e3 / (request.num_output_tokens - 1)
                for request in self.scheduler.running
                if request.metrics.first_token_time is not None and request.num_output_tokens > 1]

    def _follow_slo(self, controller: SloBudgetController) -> None:
        """Let the SLO loop move its two knobs, which are the scheduler's own limits (set
        before it schedules); a move is logged, so a server's log traces the loop (the cap's
        moves, which come every few steps under load, at debug level)."""
        before = (self.scheduler.max_num_batched_tokens, self.scheduler.max_num_seqs)
        assert self._late_last is not None  # set with the controller
        self.scheduler.max_num_batched_tokens = controller.update(
            time.time(), self._late_last.head_on_time_arrival, self.scheduler.num_running,
            late_requests_wait=self._late_last.num_late > 0, running_tpots_ms=self._running_tpots_ms)
        self.scheduler.max_num_seqs = controller.max_running
        if (self.scheduler.max_num_batched_tokens, self.scheduler.max_num_seqs) != before:
            budget_moved = self.scheduler.max_num_batched_tokens != before[0]
            logger.log(logging.INFO if budget_moved else logging.DEBUG,
                       "slo: step token budget %d, running requests cap %d (window attainment %s)",
                       self.scheduler.max_num_batched_tokens, self.scheduler.max_num_seqs,
                       "-" if controller.attainment is None else f"{controller.attainment:.2f}")

    def step(self) -> list[RequestOutput]:
        """Run one scheduled batch; outputs of requests that produced a token, finished or aborted."""
        outputs, self._pending_outputs = self._pending_outputs, []
        self.poll_weight_resize()
        if self.slo_controller is not None:
            self._follow_slo(self.slo_controller)
        swap_space = self.swap_space
        if swap_space is not None and swap_space.has_pending():
            self.scheduler.finish_swap_in(swap_space.completed())
        scheduler_output = self.scheduler.schedule()
        if swap_space is not None:
            swap_space.swap_out(scheduler_output.offload)  # first: later copies may overwrite those blocks
            for _, groups in scheduler_output.swap_out:
                swap_space.swap_out(groups)  # before the step writes into the released blocks
            for request, groups in scheduler_output.swap_in:
                swap_space.start_swap_in(request.request_id, groups)
        if scheduler_output.is_empty:
            if swap_space is not None and swap_space.has_pending():
                swap_space.wait_any()  # nothing else can run until a swapped-in request is back
            return outputs
        runner_output = self.runner.execute(scheduler_output)
        outputs.extend(self._update(scheduler_output, runner_output))
        return outputs

    def _update(self, scheduler_output: SchedulerOutput, runner_output: RunnerOutput) -> list[RequestOutput]:
        now = time.time()
        outputs: list[RequestOutput] = []
        self.scheduler.update_from_output(scheduler_output)
        for item in scheduler_output.scheduled:
            request = item.request
            prompt_logprobs = runner_output.prompt_logprobs.get(request.request_id)
            if prompt_logprobs:
                self._fill_decoded_tokens(request.request_id, prompt_logprobs)
                request.prompt_logprobs.extend(prompt_logprobs)
            sampled = runner_output.sampled.get(request.request_id)
            if sampled is None:
                continue
            token_id, logprobs = sampled
            self._append_token(request, token_id, logprobs, now)
            if request.is_finished or not request.final_output_only:
                outputs.append(self._make_output(request))
        return outputs

    def _append_token(self, request: Request, token_id: int, logprobs: PositionLogprobs | None, now: float) -> None:
        request.output_token_ids.append(token_id)
        self._num_generated_tokens_total += 1
        if request.metrics.first_token_time is None:
            request.metrics.first_token_time = now
            self._num_cached_tokens_total += request.metrics.num_cached_prompt_tokens
        if logprobs is not None:
            self._fill_decoded_tokens(request.request_id, [logprobs])
            request.output_logprobs.append(logprobs)
            request.cumulative_logprob += logprobs[token_id].logprob
        detokenizer = self._detokenizers.get(request.request_id)
        matched_stop = detokenizer.append([token_id]) if detokenizer is not None else None
        status = self._stop_status(request, token_id, matched_stop)
        if status is not None:
            self._finish(request, status)

    def _stop_status(self, request: Request, token_id: int, matched_stop: str | None) -> RequestStatus | None:
        params = request.sampling_params
        past_min = request.num_output_tokens >= params.min_tokens
        if past_min and not params.ignore_eos and token_id in request.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if past_min and token_id in params.stop_token_ids:  # type: ignore[operator]
            request.stop_reason = token_id
            return RequestStatus.FINISHED_STOPPED
        if matched_stop is not None:
            request.stop_reason = matched_stop
            return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= request.max_output_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if self.swap_space is not None and request.status == RequestStatus.SWAPPING_IN:
            self.swap_space.wait(request.request_id)  # its copy is writing into its blocks
        self.scheduler.finish_request(request, status)
        self.sampler.free(request.request_id)
        request.metrics.finished_time = time.time()
        if self.slo_controller is not None and status != RequestStatus.FINISHED_ABORTED:
            self.slo_controller.observe(request)
        detokenizer = self._detokenizers.pop(request.request_id, None)
        if detokenizer is not None:
            # A matched stop string already cut the text; otherwise release the held-back tail.
            stopped_by_string = isinstance(request.stop_reason, str)
            request.output_text = detokenizer.output_text if stopped_by_string else detokenizer.finish()
        del self._requests[request.request_id]

    def _fill_decoded_tokens(self, request_id: str, positions: list[PositionLogprobs]) -> None:
        detokenizer = self._detokenizers.get(request_id)
        if detokenizer is None:
            return
        for position in positions:
            for token_id, logprob in position.items():
                logprob.decoded_token = detokenizer.decode_token(token_id)

    def _make_output(self, request: Request) -> RequestOutput:
        if request.is_finished:
            text = request.output_text
        else:
            detokenizer = self._detokenizers.get(request.request_id)
            text = detokenizer.output_text if detokenizer is not None else ""
        params = request.sampling_params
        completion = CompletionOutput(
            index=0,
            text=text,
            token_ids=list(request.output_token_ids),
            cumulative_logprob=request.cumulative_logprob if params.logprobs is not None else None,
            logprobs=list(request.output_logprobs) if params.logprobs is not None else None,
            finish_reason=request.status.value if request.is_finished else None,
            stop_reason=request.stop_reason,
        )
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=[completion],
            finished=request.is_finished,
            prompt_logprobs=list(request.prompt_logprobs) if params.prompt_logprobs is not None else None,
            metrics=request.metrics,
        )

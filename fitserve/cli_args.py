"""Command-line flags for `EngineArgs`, shared by `generate`, `chat`, `serve` and `bench`."""

from __future__ import annotations

import argparse

from fitserve.config import EngineArgs


def add_engine_arguments(parser: argparse.ArgumentParser, model_flag: bool = True) -> None:
    """Add one flag per `EngineArgs` field (vLLM's spelling where vLLM has the same flag)."""
    group = parser.add_argument_group("engine")
    if model_flag:
        group.add_argument("--model", default=None, help="Hugging Face model directory (default: the bundled model)")
    group.add_argument("--tokenizer", default=None, help="tokenizer directory, if not the model's")
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    group.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    group.add_argument("--kv-cache-memory", default=None, help="bytes for the KV cache, e.g. 2GiB")
    group.add_argument("--gpu-memory-utilization", type=float, default=0.9,
                       help="share of GPU memory to use when --kv-cache-memory is not given")
    group.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="token budget per engine step")
    group.add_argument("--max-num-seqs", type=int, default=128, help="most requests running at once")
    group.add_argument("--max-model-len", type=int, default=None, help="context length (prompt + output)")
    group.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                       help="turn prefix caching off")
    group.add_argument("--no-enable-chunked-prefill", dest="enable_chunked_prefill", action="store_false",
                       help="prefill each prompt in one step (may stall running decodes)")
    group.add_argument("--seed", type=int, default=0, help="seed for requests that set none")
    group.add_argument("--num-threads", type=int, default=None, help="CPU threads for torch")
    group.add_argument("--attention-backend", default="auto", choices=["auto", "torch", "triton"])
    group.add_argument("--enforce-eager", action="store_true", help="disable CUDA graphs")
    group.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority", "vtc"],
                       help="fcfs (arrival order), priority (request's priority, lower first) or "
                            "vtc (fair share of tokens between clients)")
    group.add_argument("--vtc-prompt-token-weight", type=float, default=1.0,
                       help="vtc: service charged per prompt token")
    group.add_argument("--vtc-output-token-weight", type=float, default=2.0,
                       help="vtc: service charged per generated token")
    group.add_argument("--preemption-mode", default="recompute", choices=["recompute", "swap"],
                       help="when KV blocks run out: recompute the preempted request later, or swap its KV "
                            "to host memory and back")
    group.add_argument("--swap-space", default="4GiB", help="host memory for swapped KV, e.g. 4GiB")
    group.add_argument("--slo", default=None, metavar="SPEC",
                       help="latency targets the step token budget follows, e.g. ttft=500ms,tpot=50ms,p=90")
    group.add_argument("--max-seq-len-to-capture", type=int, default=8192,
                       help="longest context a CUDA-graph decode step serves; longer ones run eagerly")


def engine_args_from(namespace: argparse.Namespace) -> EngineArgs:
    """Build `EngineArgs` from parsed flags (ignores flags that are not engine settings)."""
    values = vars(namespace)
    return EngineArgs(**{name: values[name] for name in EngineArgs.field_names() if name in values})

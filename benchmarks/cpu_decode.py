"""CPU performance side by side: fitserve vs llama.cpp vs transformers, in one run.

Random weights with the shapes of real models (speed does not depend on weight values).
Every number comes with the machine's own limits measured in the same run (read and copy
bandwidth, matmul FLOP/s per dtype), re-measured before each repetition because the limit
itself drifts on shared machines. Systems alternate within each repetition; medians are
reported and the JSON keeps every run.

Sections (each can be skipped):
  single   single-stream decode tokens/s vs the bandwidth bound (bytes of weights + KV read
           per step / read bandwidth), for each system and dtype; fitserve and llama.cpp are
           also judged step by step against a read of the same bytes right after each step
           (the paired fraction: both timings see the same phase of a shared machine);
           where the machine read at two rates during the run, steps are also split by
           that read and systems compared within each phase (`single_stream_by_phase`)
  serve    32 requests (input 64-512, output 64-256 tokens, fixed seed): end-to-end output
           tokens/s including prefill; fitserve at 1, 4, 16 and 32 concurrent requests,
           llama.cpp (batch API, continuous batching) and transformers `generate` (padded
           batches) at 32; fitserve's decode-only rate at 32 vs the matmul bound
  overhead fitserve's decode step at 32 running requests split into schedule, tensor
           building, forward, logits, sampling and update/detokenize (synthetic word-level
           tokenizer of the model's vocabulary size, so detokenization really runs)
  prefill  one 1024-token prompt: achieved FLOP/s vs measured matmul FLOP/s

    python benchmarks/cpu_decode.py                                 # everything, Qwen2.5-0.5B shape
    python benchmarks/cpu_decode.py --preset llama-3.2-1b --skip-transformers
    python benchmarks/cpu_decode.py --sections single prefill --repeats 1 --num-layers 2   # smoke test

llama.cpp is optional (`pip install "fitserve[bench]"`); without it its columns are absent.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CHECKPOINT_CACHE, describe_machine, quantized_checkpoint, random_checkpoint, summarize,  # noqa: E402
                    synthetic_tokenizer, write_result)

from fitserve.bench.roofline import (  # noqa: E402
    ModelShape,
    measure_dtype_matmul_flops,
    measure_matmul_flops,
    measure_memory_bandwidth,
    memory_test_bytes,
)
from fitserve.models import host_memory  # noqa: E402

SERVE_CONCURRENCY = (1, 4, 16, 32)


# ------------------------------------------------------------------------------ machine

def measure_read_bandwidth(size_bytes: int | None = None, min_time_s: float = 0.3) -> float:
    """Bytes/s of reading a large tensor once (a sum: no writes); best of repeats. The buffer
    is larger than the CPU's caches (`memory_test_bytes`), as a model's weights are. Where
    the kernel offers transparent huge pages, a second buffer in them is read alternately and
    the best of both counts: fitserve keeps its weights in huge pages, and the bound must be
    the machine's best read rate, not one that only 4 KiB pages get (~3% lower on Zen 4)."""
    size_bytes = size_bytes or memory_test_bytes(torch.device("cpu"))
    sources = [torch.ones(size_bytes // 4, dtype=torch.float32)]
    if host_memory.huge_pages_available():
        sources.append(host_memory.huge_page_buffer(size_bytes // 4 * 4).view(torch.float32).fill_(1.0))
    for source in sources:
        source.sum()
    best, spent = 0.0, 0.0
    while spent < min_time_s or best == 0.0:
        for source in sources:
            start = time.perf_counter()
            source.sum()
            elapsed = time.perf_counter() - start
            spent += elapsed
            best = max(best, size_bytes / elapsed)
    return best


def measure_machine() -> dict:
    cpu = torch.device("cpu")
    read = measure_read_bandwidth()
    copy = measure_memory_bandwidth(cpu)
    fp32, fp32_size = measure_matmul_flops(cpu, torch.float32)
    bf16, bf16_size, bf16_arithmetic = measure_dtype_matmul_flops(cpu, torch.bfloat16,
                                                                  float32_measured=(fp32, fp32_size))
    return {
        "read_bandwidth_bytes_per_s": read, "copy_bandwidth_bytes_per_s": copy,
        "bandwidth_bytes_per_s": max(read, copy),
        "matmul_flops_per_s": {"float32": fp32, "bfloat16": bf16},
        "matmul_size": {"float32": fp32_size, "bfloat16": bf16_size},
        # "float32" where torch's own bf16 matmul is slower than widening to float32 (CPUs
        # without bf16 arithmetic): the bf16 limit is then the float32 rate.
        "matmul_arithmetic": {"float32": "float32", "bfloat16": bf16_arithmetic},
    }


class PairedRead:
    """A read of memory right after each decode step (outside the step's timing).

    A shared VM's bandwidth swings 2x within minutes, so a step and a read test seconds apart
    can see different machines; a step and the read that follows it see the same one. Each
    step's fraction of the limit is then its bytes/s over the read's bytes/s. The read covers
    the step's own bytes up to 1 GiB (one buffer for every model and dtype: a float32
    Llama-3.2-1B step reads 5 GB), in huge pages where the kernel offers them, as fitserve's
    weights are.
    """

    MAX_BYTES = 1 << 30

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def _read_view(self, step_bytes: int) -> torch.Tensor:
        if self._buffer is None:
            floats = self.MAX_BYTES // 4
            buffer = (host_memory.huge_page_buffer(floats * 4).view(torch.float32) if host_memory.huge_pages_available()
                      else torch.empty(floats, dtype=torch.float32))
            self._buffer = buffer.fill_(1.0)
        return self._buffer[: min(step_bytes, self.MAX_BYTES) // 4]

    def measure(self, run_steps, step_bytes: int) -> tuple[list[float], list[float], list[float]]:
        """(step seconds, per-step fractions of the read rate, read rates in bytes/s) of
        run_steps(after_step), which returns step seconds and calls after_step() after timing
        each step."""
        view = self._read_view(step_bytes)
        read_rates: list[float] = []

        def read() -> None:
            start = time.perf_counter()
            view.sum()
            read_rates.append(view.numel() * 4 / (time.perf_counter() - start))

        step_seconds = run_steps(read)
        fractions = [step_bytes / seconds / rate for seconds, rate in zip(step_seconds, read_rates, strict=True)]
        return step_seconds, fractions, read_rates


def median_machine(samples: list[dict]) -> dict:
    return {
        "bandwidth_bytes_per_s": statistics.median(s["bandwidth_bytes_per_s"] for s in samples),
        "read_bandwidth_bytes_per_s": statistics.median(s["read_bandwidth_bytes_per_s"] for s in samples),
        "copy_bandwidth_bytes_per_s": statistics.median(s["copy_bandwidth_bytes_per_s"] for s in samples),
        "matmul_flops_per_s": {d: statistics.median(s["matmul_flops_per_s"][d] for s in samples)
                               for d in ("float32", "bfloat16")},
    }


# ------------------------------------------------------------------------------ workload

def make_prompt(length: int, vocab_size: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab_size) for _ in range(length)]


def serve_workload(num: int, vocab_size: int, seed: int = 0, input_range: tuple[int, int] = (64, 512),
                   output_range: tuple[int, int] = (64, 256)) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    workload = []
    for _ in range(num):
        input_len, output_len = rng.randint(*input_range), rng.randint(*output_range)
        workload.append(([rng.randrange(10, vocab_size) for _ in range(input_len)], output_len))
    return workload


def activation_dtype(label: str) -> str:
    """The dtype a run's matmuls are judged by: its own for dense fitserve runs, bfloat16 for
    quantized formats (their activations) and llama.cpp (which multiplies bf16 or in integers)."""
    return label if label in ("bfloat16", "float32") else "bfloat16"


# ------------------------------------------------------------------------------ fitserve

class FitserveSide:
    def __init__(self, model_dir: Path, dtype: str, kv_memory: str, num_threads: int, tokenizer: Path) -> None:
        from fitserve import LLM

        self.llm = LLM(str(model_dir), tokenizer=str(tokenizer), dtype=dtype, kv_cache_memory=kv_memory,
                       max_num_seqs=32, num_threads=num_threads, enable_prefix_caching=False)
        self.engine = self.llm.engine
        self.counter = 0

    def _add(self, prompt: list[int], max_tokens: int) -> None:
        from fitserve import SamplingParams

        self.counter += 1
        self.engine.add_request(f"b{self.counter}", {"prompt_token_ids": prompt},
                                SamplingParams(max_tokens=max_tokens, ignore_eos=True))

    def single_stream(self, prompt: list[int], num_tokens: int, after_step=None) -> list[float]:
        """Seconds of each decode step; after_step() (untimed) runs after each."""
        self._add(prompt, num_tokens + 1)
        self.engine.step()  # the prefill, which also samples the first token
        step_seconds = []
        while self.engine.has_unfinished_requests():
            start = time.perf_counter()
            self.engine.step()
            step_seconds.append(time.perf_counter() - start)
            if after_step is not None:
                after_step()
        return step_seconds

    def prefill(self, prompt: list[int]) -> float:
        self._add(prompt, 1)
        start = time.perf_counter()
        self.engine.step()
        elapsed = time.perf_counter() - start
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return elapsed

    def serve(self, workload: list[tuple[list[int], int]], breakdown: bool = False) -> dict:
        """All requests at once through the engine; per-step timings of its parts if asked."""
        engine = self.engine
        timers: dict[str, float] = {}
        restore = []

        def timed(owner, name: str, key: str) -> None:
            original = getattr(owner, name)

            def wrapper(*args, **kwargs):
                start = time.perf_counter()
                try:
                    return original(*args, **kwargs)
                finally:
                    timers[key] = timers.get(key, 0.0) + time.perf_counter() - start

            setattr(owner, name, wrapper)
            restore.append((owner, name))

        step_shape: dict = {}
        original_execute = engine.runner.execute

        def execute(scheduler_output):
            step_shape["batch"] = len(scheduler_output.scheduled)
            step_shape["decode_only"] = all(item.num_new_tokens == 1 for item in scheduler_output.scheduled)
            return original_execute(scheduler_output)

        engine.runner.execute = execute
        restore.append((engine.runner, "execute"))
        if breakdown:
            timed(engine.scheduler, "schedule", "schedule")
            timed(engine.runner, "execute", "execute")
            timed(engine.runner.model, "forward", "forward")
            timed(engine.runner.model, "compute_logits", "logits")
            timed(engine.runner.sampler, "sample", "sample")
        for prompt, max_tokens in workload:
            self._add(prompt, max_tokens)
        steps = []
        start = time.perf_counter()
        while engine.has_unfinished_requests():
            timers.clear()
            step_shape.clear()
            step_start = time.perf_counter()
            outputs = engine.step()
            step_seconds = time.perf_counter() - step_start
            steps.append({"seconds": step_seconds, "tokens": len(outputs), "running_before": step_shape.get("batch", 0),
                          "decode_only": step_shape.get("decode_only", False), **dict(timers)})
        elapsed = time.perf_counter() - start
        for owner, name in reversed(restore):
            if name in vars(owner):
                delattr(owner, name)
        produced = sum(n for _, n in workload)
        return {"seconds": elapsed, "output_tokens": produced, "steps": steps}


# ------------------------------------------------------------------------------ transformers

class TransformersSide:
    def __init__(self, model_dir: Path, dtype: str) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype)).eval()

    def _generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int) -> float:
        from transformers import GenerationConfig

        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
        start = time.perf_counter()
        with torch.inference_mode():
            self.model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return time.perf_counter() - start

    def single_stream(self, prompt: list[int], num_tokens: int) -> float:
        """Decode tokens/s: the difference of a 1-token and an (n+1)-token generate."""
        ids = torch.tensor([prompt])
        mask = torch.ones_like(ids)
        first = self._generate(ids, mask, 1)
        full = self._generate(ids, mask, num_tokens + 1)
        return num_tokens / (full - first)

    def serve(self, workload: list[tuple[list[int], int]], batch_size: int) -> dict:
        order = sorted(range(len(workload)), key=lambda i: len(workload[i][0]))
        elapsed = 0.0
        for first in range(0, len(order), batch_size):
            batch = [workload[i] for i in order[first : first + batch_size]]
            longest = max(len(ids) for ids, _ in batch)
            input_ids = torch.zeros((len(batch), longest), dtype=torch.long)
            mask = torch.zeros_like(input_ids)
            for row, (ids, _) in enumerate(batch):  # left padding, as decoder-only generation needs
                input_ids[row, longest - len(ids):] = torch.tensor(ids)
                mask[row, longest - len(ids):] = 1
            elapsed += self._generate(input_ids, mask, max(n for _, n in batch))
        return {"seconds": elapsed, "output_tokens": sum(n for _, n in workload)}


# ------------------------------------------------------------------------------ report math

def single_stream_context(args) -> float:
    """The mean context of a single-stream measurement: its prompt and half its tokens."""
    return args.single_prompt + args.single_tokens / 2


def decode_flops_per_token(shape: ModelShape, context: float) -> float:
    return 2.0 * shape.matmul_params_per_token + shape.attention_flops(1, context)


def overhead_summary(steps: list[dict], batch: int) -> dict | None:
    """Decode steps with `batch` running requests: where the step time goes."""
    chosen = [s for s in steps if s["decode_only"] and s["running_before"] == batch and "forward" in s]
    if not chosen:
        return None
    def median(key):
        return statistics.median(s.get(key, 0.0) for s in chosen)
    step = median("seconds")
    parts = {
        "schedule": median("schedule"),
        "runner_prepare": statistics.median(
            s["execute"] - s["forward"] - s.get("logits", 0.0) - s.get("sample", 0.0) for s in chosen),
        "forward": median("forward"),
        "logits": median("logits"),
        "sample": median("sample"),
        "update_detokenize": statistics.median(s["seconds"] - s["schedule"] - s["execute"] for s in chosen),
    }
    outside = statistics.median(s["seconds"] - s["forward"] - s.get("logits", 0.0) for s in chosen)
    return {"num_steps": len(chosen), "step_ms": step * 1e3,
            "parts_ms": {k: v * 1e3 for k, v in parts.items()},
            "outside_model_ms": outside * 1e3, "outside_model_fraction": outside / step}


# ------------------------------------------------------------------------------ main

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="qwen2.5-0.5b")
    parser.add_argument("--num-layers", type=int, default=None, help="fewer layers (smoke tests only)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"], help="fitserve dtypes")
    parser.add_argument("--transformers-dtypes", nargs="+", default=["bfloat16", "float32"],
                        help="transformers dtypes for single-stream decode")
    parser.add_argument("--transformers-serve-dtype", default="float32",
                        help="transformers dtype for the 32-request run (its fastest on CPUs without native bf16)")
    parser.add_argument("--transformers-batch-size", type=int, default=32)
    parser.add_argument("--sections", nargs="+", default=["single", "serve", "overhead", "prefill"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve-repeats", type=int, default=None, help="repetitions of the serve section")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--single-prompt", type=int, default=128)
    parser.add_argument("--single-tokens", type=int, default=64)
    parser.add_argument("--skip-llama-cpp", action="store_true")
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--serve-dtypes", nargs="+", default=None,
                        help="fitserve dtypes in the serve section (default: all of --dtypes)")
    parser.add_argument("--curve-dtypes", nargs="+", default=["bfloat16"],
                        help="fitserve dtypes run at 1, 4 and 16 concurrent requests too (all dtypes run at 32)")
    parser.add_argument("--formats", nargs="+", default=[], choices=["w8", "w4", "mixllm"],
                        help="also run fitserve on copies quantized by `fitserve quantize` (bf16 activations); "
                             "mixllm's 10%% high-precision channels are drawn at random (no calibration: "
                             "speed does not depend on which channels)")
    parser.add_argument("--llama-cpp-types", nargs="+", default=["bfloat16"],
                        choices=["bfloat16", "Q4_0", "Q4_K_M", "Q8_0"],
                        help="llama.cpp weight types to run (quantized by llama.cpp's own quantizer)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny serve workload (input 16-64, output 4-12): checks the harness, not speed")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    serve_repeats = args.serve_repeats or args.repeats

    model_dir = random_checkpoint(args.preset, "bfloat16", args.num_layers)
    config = json.loads((model_dir / "config.json").read_text())
    vocab_size = config["vocab_size"]
    tokenizer = synthetic_tokenizer(vocab_size)
    shapes = {d: ModelShape.from_config(config, getattr(torch, d)) for d in ("bfloat16", "float32")}
    kv_memory = {"bfloat16": "1GiB", "float32": "2GiB"}

    llama_cpp_runners: dict = {}
    llama_cpp_version = None
    llama_cpp_build = None  # the vector extensions its CPU backend was compiled with
    llama_cpp_types: dict = {}
    if not args.skip_llama_cpp:
        try:
            import llama_cpp

            from llama_cpp_side import LlamaCppRunner, gguf_bits_per_weight, quantize_gguf, write_gguf

            llama_cpp_version = llama_cpp.__version__
            llama_cpp_build = llama_cpp.llama_print_system_info().decode().strip()
            gguf_path = write_gguf(model_dir, model_dir / "model-bf16.gguf")
            for type_name in args.llama_cpp_types:
                path = quantize_gguf(gguf_path, type_name, args.threads)
                label = type_name  # results read "llama.cpp Q4_0"; bfloat16 shares fitserve's shape
                if type_name != "bfloat16":  # bytes per step as llama.cpp stores them
                    bits = gguf_bits_per_weight(path)
                    llama_cpp_types[type_name] = bits
                    shapes[label] = dataclasses.replace(
                        shapes["bfloat16"], projection_bits=bits["projection_bits"],
                        lm_head_bits=bits["lm_head_bits"], quantization=type_name)
                llama_cpp_runners[label] = LlamaCppRunner(path, args.threads, max_seqs=32, max_len=800,
                                                          batch_tokens=2048)
        except ImportError as error:
            print(f"llama.cpp not installed ({error}); its columns are skipped", flush=True)

    fitserve = {d: FitserveSide(model_dir, d, kv_memory[d], args.threads, tokenizer) for d in args.dtypes}
    for method in args.formats:  # labelled by format; activations in bf16
        quantized_dir = quantized_checkpoint(model_dir, method)
        shapes[method] = ModelShape.from_config(json.loads((quantized_dir / "config.json").read_text()),
                                                torch.bfloat16)
        fitserve[method] = FitserveSide(quantized_dir, "bfloat16", kv_memory["bfloat16"], args.threads, tokenizer)
    transformers_dtypes = [] if args.skip_transformers else sorted(
        set(args.transformers_dtypes) | ({args.transformers_serve_dtype} if "serve" in args.sections else set()))
    hf = {d: TransformersSide(model_dir, d) for d in transformers_dtypes}

    machine_samples: list[dict] = []
    runs: dict = {"single": [], "serve": [], "prefill": []}
    single_prompt = make_prompt(args.single_prompt, vocab_size, seed=1)
    prefill_prompt = make_prompt(1024, vocab_size, seed=2)
    single_context = single_stream_context(args)
    paired = PairedRead()
    workload = (serve_workload(32, vocab_size, 0, (16, 64), (4, 12)) if args.smoke
                else serve_workload(32, vocab_size, seed=0))

    def log(text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)

    def bracketed(measure) -> tuple[float, float]:
        """measure()'s result and the read bandwidth to judge it by: the best of a read test
        just before and just after it and the repetition's own. A shared machine's bandwidth
        can swing 2x within minutes; the best value seen around a measurement is the bound
        it could have reached (and keeps its fraction from exceeding 1 when it ran in a fast
        phase that the repetition's first test missed)."""
        before = measure_read_bandwidth(min_time_s=0.15)
        result = measure()
        after = measure_read_bandwidth(min_time_s=0.15)
        return result, max(before, after, machine["bandwidth_bytes_per_s"])

    for repeat in range(args.repeats):
        machine = measure_machine()
        machine_samples.append(machine)
        log(f"rep {repeat}: read {machine['read_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, copy "
            f"{machine['copy_bandwidth_bytes_per_s'] / 1e9:.1f} GB/s, matmul fp32 "
            f"{machine['matmul_flops_per_s']['float32'] / 1e9:.1f} GF/s, bf16 "
            f"{machine['matmul_flops_per_s']['bfloat16'] / 1e9:.1f} GF/s")
        if "single" in args.sections:
            single_sides = [("fitserve", dtype, side.single_stream) for dtype, side in fitserve.items()]
            for label, runner in llama_cpp_runners.items():
                single_sides.append(("llama.cpp", label, runner.single_stream))
            for system, dtype, single_stream in single_sides:
                step_bytes = shapes[dtype].decode_step_bytes(1, single_context)
                measured: dict = {}

                def measure(single_stream=single_stream, step_bytes=step_bytes, measured=measured) -> float:
                    steps, fractions, read_rates = paired.measure(
                        lambda after_step: single_stream(single_prompt, args.single_tokens, after_step), int(step_bytes))
                    measured["paired_fraction"] = statistics.median(fractions)
                    measured["paired_read_bytes_per_s"] = statistics.median(read_rates)
                    measured["step_seconds"] = steps  # per step, for the phase-matched summary
                    measured["step_read_bytes_per_s"] = read_rates
                    return 1.0 / statistics.median(steps)

                rate, bound_bandwidth = bracketed(measure)
                runs["single"].append({"repeat": repeat, "system": system, "dtype": dtype, "tokens_per_s": rate,
                                       "bound_bandwidth_bytes_per_s": bound_bandwidth, **measured, "machine": machine})
                log(f"single {system} {dtype}: {rate:.2f} tok/s (bound bandwidth {bound_bandwidth / 1e9:.1f} GB/s; "
                    f"{measured['paired_fraction']:.1%} of the read rate right after each step)")
            for dtype in args.transformers_dtypes if not args.skip_transformers else []:
                tokens = min(args.single_tokens, 32 if dtype == "bfloat16" else args.single_tokens)
                rate, bound_bandwidth = bracketed(lambda: hf[dtype].single_stream(single_prompt, tokens))
                runs["single"].append({"repeat": repeat, "system": "transformers", "dtype": dtype, "tokens_per_s": rate,
                                       "bound_bandwidth_bytes_per_s": bound_bandwidth, "machine": machine})
                log(f"single transformers {dtype}: {rate:.2f} tok/s")
        if "prefill" in args.sections:
            for dtype, side in fitserve.items():
                seconds = side.prefill(prefill_prompt)
                runs["prefill"].append({"repeat": repeat, "system": "fitserve", "dtype": dtype,
                                        "seconds": seconds, "machine": machine})
                log(f"prefill fitserve {dtype}: {seconds:.2f} s")
            for label, runner in llama_cpp_runners.items():
                _, seconds = runner.prefill(prefill_prompt)
                runs["prefill"].append({"repeat": repeat, "system": "llama.cpp", "dtype": label,
                                        "seconds": seconds, "machine": machine})
                log(f"prefill llama.cpp {label}: {seconds:.2f} s")
        if repeat < serve_repeats and ("serve" in args.sections or "overhead" in args.sections):
            for dtype, side in fitserve.items():
                if args.serve_dtypes and dtype not in args.serve_dtypes:
                    continue
                concurrency = SERVE_CONCURRENCY if "serve" in args.sections and dtype in args.curve_dtypes else (32,)
                for count in concurrency:
                    result = side.serve(workload[:count], breakdown=count == 32 and "overhead" in args.sections)
                    rate = result["output_tokens"] / result["seconds"]
                    decode = [s for s in result["steps"] if s["decode_only"] and s["running_before"] == count]
                    decode_rate = (sum(s["tokens"] for s in decode) / sum(s["seconds"] for s in decode)
                                   if decode else None)
                    entry = {"repeat": repeat, "system": "fitserve", "dtype": dtype, "concurrency": count,
                             "seconds": result["seconds"], "output_tokens": result["output_tokens"],
                             "output_tokens_per_s": rate, "decode_only_tokens_per_s": decode_rate,
                             "machine": machine}
                    if count == 32:
                        entry["overhead"] = overhead_summary(result["steps"], 32)
                    runs["serve"].append(entry)
                    log(f"serve fitserve {dtype} x{count}: {rate:.2f} tok/s e2e, decode-only {decode_rate}")
            if "serve" in args.sections:
                for label, runner in llama_cpp_runners.items():
                    seconds, produced, decode_rate = runner.serve(workload)
                    runs["serve"].append({"repeat": repeat, "system": "llama.cpp", "dtype": label,
                                          "concurrency": 32, "seconds": seconds, "output_tokens": produced,
                                          "output_tokens_per_s": produced / seconds,
                                          "decode_only_tokens_per_s": decode_rate, "machine": machine})
                    log(f"serve llama.cpp {label} x32: {produced / seconds:.2f} tok/s")
                if not args.skip_transformers:
                    dtype = args.transformers_serve_dtype
                    result = hf[dtype].serve(workload, args.transformers_batch_size)
                    rate = result["output_tokens"] / result["seconds"]
                    runs["serve"].append({"repeat": repeat, "system": "transformers", "dtype": dtype,
                                          "concurrency": 32, "batch_size": args.transformers_batch_size,
                                          **result, "output_tokens_per_s": rate, "machine": machine})
                    log(f"serve transformers {dtype} x32 (batch {args.transformers_batch_size}): {rate:.2f} tok/s")
        gc.collect()

    machine = median_machine(machine_samples)
    summary = summarize_runs(runs, shapes, machine, args)
    result = {
        "benchmark": "cpu_decode",
        "machine": {**describe_machine(), "llama_cpp_python": llama_cpp_version,
                    "llama_cpp_build": llama_cpp_build, "measured_limits": machine,
                    "measured_limits_every_repeat": machine_samples},
        "model": {"preset": args.preset, "num_layers": config["num_hidden_layers"], "weights": "random (shape only)",
                  "shape": {d: s.to_dict() for d, s in shapes.items()}},
        "settings": {"threads": args.threads, "repeats": args.repeats, "serve_repeats": serve_repeats,
                     "single_stream": {"prompt_tokens": args.single_prompt, "decode_tokens": args.single_tokens},
                     "serve_workload": {"num_requests": 32, "input_len": [16, 64] if args.smoke else [64, 512],
                                        "output_len": [4, 12] if args.smoke else [64, 256],
                                        "seed": 0, "ignore_eos": True,
                                        "total_input_tokens": sum(len(p) for p, _ in workload),
                                        "total_output_tokens": sum(n for _, n in workload)},
                     "fitserve": {"max_num_batched_tokens": 2048, "enable_prefix_caching": False,
                                  "tokenizer": "synthetic word-level, model's vocabulary size"},
                     "llama_cpp": {"weights": "bf16 GGUF (norms/biases f32), quantized copies by llama.cpp's "
                                              "llama_model_quantize", "types": llama_cpp_types,
                                   "kv_cache": "f16 (default)",
                                   "n_batch": 2048, "n_ubatch": 512, "scheduling": "continuous batching, batch API"},
                     "transformers": {"serve_dtype": args.transformers_serve_dtype,
                                      "batch_size": args.transformers_batch_size,
                                      "padding": "left, sorted by length"}},
        "summary": summary,
        "runs": runs,
    }
    out = args.out or Path(__file__).resolve().parent / "results" / f"cpu_decode_{args.preset}.json"
    path = write_result("cpu_decode", result, out)
    print(json.dumps(summary, indent=2))
    if "single_stream_by_phase" in summary:
        print_by_phase(summary["single_stream_by_phase"])
    print(f"wrote {path}")
    for side in fitserve.values():
        del side
    for runner in llama_cpp_runners.values():
        runner.close()
    return 0


# Single-stream comparisons the quantized formats are judged by (numerator, denominator).
PHASE_RATIOS = (("fitserve w4", "llama.cpp Q4_0"), ("fitserve mixllm", "llama.cpp Q4_0"),
                ("fitserve mixllm", "llama.cpp Q4_K_M"), ("fitserve w8", "llama.cpp Q8_0"),
                ("fitserve w4", "fitserve bfloat16"))
MIN_PHASE_STEPS = 8  # fewer steps of a system in a phase say nothing about it


def phase_split(read_rates: list[float]) -> float | None:
    """The read rate between a shared machine's slow and fast phases, or None for one phase.

    Some VMs read memory at one of two rates (here ~33 and ~60 GB/s) and switch every ~20 s,
    so which system drew which phase decides a median of repetitions. Each step is judged
    by the read right after it: the split is the geometric mean of the 10th and 90th
    percentiles of all those reads, where they differ by more than 30%.
    """
    if len(read_rates) < 2 * MIN_PHASE_STEPS:
        return None
    ordered = sorted(read_rates)
    low, high = ordered[len(ordered) // 10], ordered[len(ordered) * 9 // 10]
    return math.sqrt(low * high) if high > 1.3 * low else None


def summarize_by_phase(runs: list[dict], step_bytes: dict[str, float]) -> dict | None:
    """Single-stream results split by the machine's read phase (steps of every repetition of a
    system pooled): each system's tokens/s and paired fraction in the slow and the fast phase,
    and the PHASE_RATIOS within each phase, so systems are compared under the same bandwidth."""
    rows = [r for r in runs if "step_seconds" in r]
    split = phase_split([rate for r in rows for rate in r["step_read_bytes_per_s"]])
    if split is None:
        return None
    systems: dict[str, dict] = {}
    for label in sorted({f"{r['system']} {r['dtype']}" for r in rows}):
        steps = [(s, rate) for r in rows if f"{r['system']} {r['dtype']}" == label
                 for s, rate in zip(r["step_seconds"], r["step_read_bytes_per_s"], strict=True)]
        for phase, in_phase in (("slow", lambda rate: rate < split), ("fast", lambda rate: rate >= split)):
            chosen = [(s, rate) for s, rate in steps if in_phase(rate)]
            if len(chosen) < MIN_PHASE_STEPS:
                continue
            systems.setdefault(label, {})[phase] = {
                "steps": len(chosen), "tokens_per_s": 1.0 / statistics.median(s for s, _ in chosen),
                "read_bytes_per_s": statistics.median(rate for _, rate in chosen),
                "paired_fraction": statistics.median(step_bytes[label] / s / rate for s, rate in chosen)}
    ratios = {}
    for numerator, denominator in PHASE_RATIOS:
        both = {phase: systems[numerator][phase]["tokens_per_s"] / systems[denominator][phase]["tokens_per_s"]
                for phase in ("slow", "fast")
                if phase in systems.get(numerator, {}) and phase in systems.get(denominator, {})}
        if both:
            ratios[f"{numerator} / {denominator}"] = both
    return {"split_read_bytes_per_s": split, "systems": systems, "ratios": ratios}


def print_by_phase(by_phase: dict) -> None:
    print(f"single stream by read phase (split at {by_phase['split_read_bytes_per_s'] / 1e9:.1f} GB/s):")
    for label, phases in by_phase["systems"].items():
        cells = [f"{phase} {p['tokens_per_s']:.1f} tok/s ({p['paired_fraction']:.2f} of {p['read_bytes_per_s'] / 1e9:.0f}"
                 f" GB/s, {p['steps']} steps)" for phase, p in phases.items()]
        print(f"  {label:22s} " + "; ".join(cells))
    for name, ratio in by_phase["ratios"].items():
        print(f"  {name:40s} " + "; ".join(f"{phase} {value:.2f}x" for phase, value in ratio.items()))


def summarize_runs(runs: dict, shapes: dict[str, ModelShape], machine: dict, args) -> dict:
    bandwidth = machine["bandwidth_bytes_per_s"]
    summary: dict = {"single_stream": {}, "serve": {}, "prefill": {}}
    single_context = single_stream_context(args)
    step_bytes: dict[str, float] = {}  # "system dtype" -> bytes a single-stream step reads
    for key in sorted({(r["system"], r["dtype"]) for r in runs["single"]}):
        rows = [r for r in runs["single"] if (r["system"], r["dtype"]) == key]
        label = f"{key[0]} {key[1]}"
        step_bytes[label] = bytes_per_step = shapes[key[1]].decode_step_bytes(1, single_context)
        bandwidths = [r.get("bound_bandwidth_bytes_per_s", r["machine"]["bandwidth_bytes_per_s"]) for r in rows]
        fractions = [r["tokens_per_s"] * bytes_per_step / bw for r, bw in zip(rows, bandwidths, strict=True)]
        summary["single_stream"][label] = {
            "tokens_per_s": summarize([r["tokens_per_s"] for r in rows]),
            "bytes_per_step": bytes_per_step,
            "bound_tokens_per_s": statistics.median(bandwidths) / bytes_per_step,
            "fraction_of_bandwidth_bound": summarize(fractions),
        }
        if all("paired_fraction" in r for r in rows):
            summary["single_stream"][label]["fraction_of_paired_read"] = summarize(
                [r["paired_fraction"] for r in rows])
    by_phase = summarize_by_phase(runs["single"], step_bytes)
    if by_phase is not None:
        summary["single_stream_by_phase"] = by_phase
    for key in sorted({(r["system"], r["dtype"], r["concurrency"]) for r in runs["serve"]}):
        rows = [r for r in runs["serve"] if (r["system"], r["dtype"], r["concurrency"]) == key]
        entry = {"output_tokens_per_s": summarize([r["output_tokens_per_s"] for r in rows])}
        decode = [r["decode_only_tokens_per_s"] for r in rows if r.get("decode_only_tokens_per_s")]
        if decode:
            entry["decode_only_tokens_per_s"] = summarize(decode)
        if key[2] == 32 and decode:
            shape = shapes[key[1]]
            context = 288 + 80  # mean prompt + about half the mean output at full batch
            # The same dtype's measured matmul rate: on CPUs with AMX / AVX512-BF16 bf16 runs
            # several times faster than float32; elsewhere it is the float32 rate (widened).
            peak = machine["matmul_flops_per_s"][activation_dtype(key[1])]
            entry["decode_matmul_bound_dtype"] = key[1]
            entry["decode_matmul_bound_tokens_per_s"] = peak / decode_flops_per_token(shape, context)
            entry["decode_fraction_of_matmul_bound"] = statistics.median(decode) / entry["decode_matmul_bound_tokens_per_s"]
        overheads = [r["overhead"] for r in rows if r.get("overhead")]
        if overheads:
            entry["overhead_at_32"] = min(overheads, key=lambda o: o["outside_model_fraction"]) | {
                "outside_model_fraction_all_repeats": [o["outside_model_fraction"] for o in overheads]}
        summary["serve"][f"{key[0]} {key[1]} x{key[2]}"] = entry
    fitserve_32 = {k: v["output_tokens_per_s"]["median"] for k, v in summary["serve"].items() if k.endswith("x32")}
    best_fitserve = max((v for k, v in fitserve_32.items() if k.startswith("fitserve")), default=None)
    for other in ("llama.cpp", "transformers"):
        others = [v for k, v in fitserve_32.items() if k.startswith(other)]
        if best_fitserve and others:
            summary["serve"][f"ratio_fitserve_best_over_{other}_x32"] = best_fitserve / max(others)
    for key in sorted({(r["system"], r["dtype"]) for r in runs["prefill"]}):
        rows = [r for r in runs["prefill"] if (r["system"], r["dtype"]) == key]
        flops = shapes[key[1]].prefill_flops(1024)
        achieved = [flops / r["seconds"] for r in rows]
        summary["prefill"][f"{key[0]} {key[1]}"] = {
            "seconds": summarize([r["seconds"] for r in rows]), "flops": flops,
            "achieved_flops_per_s": summarize(achieved),
            "fraction_of_float32_matmul": summarize(
                [a / r["machine"]["matmul_flops_per_s"]["float32"] for a, r in zip(achieved, rows)]),
            "fraction_of_same_dtype_matmul": summarize(
                [a / r["machine"]["matmul_flops_per_s"][activation_dtype(key[1])] for a, r in zip(achieved, rows)]),
        }
    return summary


if __name__ == "__main__":
    sys.exit(main())

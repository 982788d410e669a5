"""`fitserve bench`: measure any OpenAI-compatible server (or start a fitserve one) and
`fitserve bench compare A.json B.json`."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fitserve.bench.arrivals import parse_rate
from fitserve.bench.slo import SLO_PRESETS, parse_slo
from fitserve.cli_args import HelpFormatter

if TYPE_CHECKING:  # the load generator, samplers and torch load only when a bench runs,
    from fitserve.bench.workload import WorkloadConfig  # so that `fitserve --help` stays fast


def _rates(text: str) -> list[float]:
    try:
        return [parse_rate(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _client_rates(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--client-rates takes numbers separated by commas (got {text!r})") from error


def _slo(text: str):
    try:
        return parse_slo(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--url", default=None, help="root of a running OpenAI-compatible server, e.g. "
                        "http://127.0.0.1:8000 (default: start a fitserve server for --model)")
    target.add_argument("--model", default=None, metavar="DIR",
                        help="model directory to serve with a fitserve server started for the run "
                             "(default: the bundled model)")
    target.add_argument("--server-args", default="", metavar="ARGS",
                        help='extra flags for `fitserve serve`, quoted, e.g. "--dtype float32"')
    target.add_argument("--server-start-timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long the server started for --model may take to answer /health")
    target.add_argument("--model-info", default=None, metavar="DIR",
                        help="with --url: a local copy of the served model's directory "
                             "(its tokenizer and config.json give exact prompt lengths and the roofline)")
    target.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory for prompt lengths")
    target.add_argument("--served-model-name", default=None, help="`model` field to send (default: the first of /v1/models)")
    target.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    target.add_argument("--endpoint", default="auto", choices=["auto", "completions", "chat"],
                        help="auto: chat for multi-turn, completions otherwise")

    workload = parser.add_argument_group("workload")
    workload.add_argument("--workload", default=None,
                          choices=["synthetic", "sharegpt", "shared-prefix", "multi-turn", "multi-tenant"],
                          help="default: sharegpt when --dataset-path is given, else synthetic")
    workload.add_argument("--dataset-path", default=None, metavar="FILE", help="ShareGPT-format JSON")
    workload.add_argument("--num-requests", type=int, default=50, help="requests in each run")
    for kind, default in (("input", 128), ("output", 128)):
        workload.add_argument(f"--{kind}-len", type=int, default=default, metavar="TOKENS",
                              help=f"mean {kind} length in tokens")
        workload.add_argument(f"--{kind}-len-dist", default="fixed", choices=["fixed", "uniform", "normal"],
                              help=f"distribution of {kind} lengths around the mean")
        workload.add_argument(f"--{kind}-len-spread", type=float, default=0.25, metavar="FRACTION",
                              help="uniform: half-width, normal: standard deviation, as a fraction of the mean")
    workload.add_argument("--prefix-len", type=int, default=256, help="shared-prefix: tokens in each shared prefix")
    workload.add_argument("--num-prefixes", type=int, default=4, help="shared-prefix: distinct prefixes")
    workload.add_argument("--num-turns", type=int, default=3, help="multi-turn: turns per conversation")
    workload.add_argument("--clients", type=int, default=4,
                          help="multi-tenant: clients (each request carries its client as the `user` field)")
    workload.add_argument("--client-rates", type=_client_rates, default=None, metavar="W[,W...]",
                          help="multi-tenant: relative request rate per client, e.g. 4,1,1,1 (default: equal); "
                               "--rate is the total")
    workload.add_argument("--seed", type=int, default=0, help="seed of prompts, lengths and arrivals")
    workload.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent with each request")
    workload.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                          help="do not send ignore_eos (for servers that reject it); outputs may end early")

    load = parser.add_argument_group("load")
    load.add_argument("--rate", type=_rates, default=[math.inf], metavar="R[,R...]",
                      help="requests (conversations) per second; inf = all at once; several = a sweep")
    load.add_argument("--concurrency", type=int, default=None, metavar="C",
                      help="most requests in flight; with rate inf a closed loop of C streams")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of inter-arrival times: 1 = Poisson, <1 burstier, >1 smoother")
    load.add_argument("--slo", type=_slo, default=None, metavar="SPEC",
                      help=f"limits for goodput, e.g. ttft=500ms,tpot=50ms,e2e=10s,p=99 or a preset: "
                           f"{', '.join(SLO_PRESETS)}")
    load.add_argument("--slo-search", action="store_true",
                      help="search for the highest rate meeting --slo at its percentile (starts at --rate)")
    load.add_argument("--search-steps", type=int, default=4, help="bisection steps of --slo-search")
    load.add_argument("--request-timeout", type=float, default=600.0, metavar="SECONDS",
                      help="a request running longer is cancelled and counted as failed")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--idle-seconds", type=float, default=2.0, help="idle baseline before the runs")
    hardware.add_argument("--sample-interval", type=float, default=0.5, metavar="SECONDS",
                          help="time between two samples of the hardware counters")
    hardware.add_argument("--no-hardware", dest="hardware", action="store_false", help="no counters sampled")
    hardware.add_argument("--no-roofline", dest="roofline", action="store_false",
                          help="skip the bandwidth/matmul micro-benchmark and the roofline")
    hardware.add_argument("--roofline-device", default="auto", help="auto, cpu or cuda[:N]: where the server computes")
    hardware.add_argument("--roofline-dtype", default="auto", help="auto (as the server resolves it) or a dtype")
    hardware.add_argument("--roofline-seconds", type=float, default=0.3, help="time per micro-benchmark")

    output = parser.add_argument_group("output")
    output.add_argument("--out", default=None, metavar="DIR",
                        help="where bench.json, requests.csv and report.html go (default: bench-results/<time>)")
    output.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def add_bench_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `bench` (and `bench compare`) on the top-level CLI."""
    parser = subparsers.add_parser("bench", help="measure an OpenAI-compatible server (latency, throughput, "
                                   "goodput, memory, energy, roofline)", description=__doc__,
                                   formatter_class=HelpFormatter)
    add_bench_arguments(parser)
    parser.set_defaults(func=run_bench)
    actions = parser.add_subparsers(dest="bench_action", metavar="compare")
    compare = actions.add_parser("compare", help="put two bench JSON reports side by side",
                                 formatter_class=HelpFormatter)
    compare.add_argument("report_a", metavar="A.json")
    compare.add_argument("report_b", metavar="B.json")
    compare.set_defaults(func=run_compare_command)
    return parser


def run_compare_command(args: argparse.Namespace) -> int:
    from fitserve.bench.compare import run_compare

    return run_compare(args.report_a, args.report_b)


def _server_flag(server_args: str, flag: str) -> str | None:
    tokens = shlex.split(server_args)
    for index, token in enumerate(tokens):
        if token == flag and index + 1 < len(tokens):
            return tokens[index + 1]
        if token.startswith(flag + "="):
            return token.split("=", 1)[1]
    return None


def _load_tokenizer(directory: Path | None):
    if directory is None:
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as error:  # any tokenizer problem: fall back to approximate lengths, say so
        print(f"fitserve bench: no tokenizer in {directory} ({type(error).__name__}); prompt lengths "
              "will be approximate", file=sys.stderr)
        return None


def _model_shape(args, model_dir: Path | None):
    """(ModelShape, device) of the served model as the server runs it; (None, None) unknown."""
    from fitserve.bench.roofline import ModelShape
    from fitserve.config import parse_size, resolve_device

    if model_dir is None or not (model_dir / "config.json").is_file():
        return None, None
    device = resolve_device(args.roofline_device if args.roofline_device != "auto"
                            else (_server_flag(args.server_args, "--device") or "auto"))
    dtype_name = args.roofline_dtype if args.roofline_dtype != "auto" else (_server_flag(args.server_args, "--dtype") or "auto")
    kv_cache_dtype = _server_flag(args.server_args, "--kv-cache-dtype") or "auto"
    weight_memory = _server_flag(args.server_args, "--weight-memory")
    return ModelShape.from_model_dir(model_dir, dtype_name, device, kv_cache_dtype,
                                     parse_size(weight_memory) if weight_memory else None), device


def _measure_limit(args, shape, device) -> dict | None:
    """The machine's bandwidth and matmul FLOP/s now (None when skipped or impossible)."""
    import torch

    from fitserve.bench.roofline import measure_hardware_limit

    if shape is None or not args.roofline:
        return None
    print("fitserve bench: measuring memory bandwidth and matmul throughput…", file=sys.stderr)
    try:
        return measure_hardware_limit(device, getattr(torch, shape.dtype_name), args.roofline_seconds)
    except RuntimeError as error:  # e.g. the server already holds the GPU's memory
        print(f"fitserve bench: could not measure the hardware limit ({error}); the report will "
              "have no roofline", file=sys.stderr)
        return None
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()  # hand the micro-benchmark's memory back before the load


def _workload_from(args: argparse.Namespace) -> WorkloadConfig:
    """The workload the flags describe; invalid values raise before any server is started."""
    from fitserve.bench.workload import LengthSpec, WorkloadConfig

    if args.num_requests < 1:
        raise ValueError(f"--num-requests must be >= 1 (got {args.num_requests})")
    if args.concurrency is not None and args.concurrency < 1:
        raise ValueError(f"--concurrency must be >= 1 (got {args.concurrency})")
    if not args.burstiness > 0:
        raise ValueError(f"--burstiness must be > 0 (got {args.burstiness})")
    if args.slo_search and args.slo is None:
        raise ValueError("--slo-search needs --slo (limits or a preset such as mlperf-server)")
    kind = args.workload or ("sharegpt" if args.dataset_path else "synthetic")
    config = WorkloadConfig(
        kind=kind, num_requests=args.num_requests,
        input_len=LengthSpec(args.input_len, args.input_len_dist, args.input_len_spread),
        output_len=LengthSpec(args.output_len, args.output_len_dist, args.output_len_spread),
        dataset_path=args.dataset_path, prefix_len=args.prefix_len, num_prefixes=args.num_prefixes,
        num_turns=args.num_turns, num_clients=args.clients, client_rates=args.client_rates, seed=args.seed)
    if kind == "multi-tenant":
        config.relative_client_rates()  # bad --clients / --client-rates fail before a server starts
    return config


def _served_model_name(base_url: str, api_key: str | None) -> str:
    """The model a running server serves; a server that cannot be reached is a one-line error."""
    import httpx

    from fitserve.bench.client import fetch_model_name

    try:
        return asyncio.run(fetch_model_name(base_url, api_key=api_key))
    except httpx.HTTPStatusError as error:
        raise ValueError(f"{base_url}/v1/models answered HTTP {error.response.status_code}; "
                         "check --url and --api-key") from None
    except (httpx.TransportError, httpx.InvalidURL, ValueError) as error:
        reason = str(error) or type(error).__name__
        raise ValueError(f"could not connect to {base_url} ({reason}); is the server running?") from None
    except RuntimeError as error:  # it answered, but lists no model
        raise ValueError(str(error)) from None


def run_bench(args: argparse.Namespace) -> int:
    from fitserve.bench.environment import is_local_url, pid_listening_on
    from fitserve.bench.server_process import ServerProcess
    from fitserve.config import default_model_dir

    if args.url and args.model:
        raise ValueError("give --url (a running server) or --model (start one), not both; "
                         "with --url, --model-info DIR names a local copy of its model")
    workload = _workload_from(args)
    out_dir = Path(args.out or Path("bench-results") / dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    server = None
    if args.url:
        base_url, model_dir = args.url.rstrip("/"), (Path(args.model_info) if args.model_info else None)
        # Reach the server before anything is written, so a wrong URL leaves no empty folder.
        args.served_model_name = args.served_model_name or _served_model_name(base_url, args.api_key)
        out_dir.mkdir(parents=True, exist_ok=True)
        local = is_local_url(base_url)
        server_pid = pid_listening_on(base_url) if local and args.hardware else None
    else:
        out_dir.mkdir(parents=True, exist_ok=True)
        model_dir = Path(args.model) if args.model else default_model_dir()
        if not (model_dir / "config.json").is_file():
            raise ValueError(f"{model_dir} has no config.json: give --model a Hugging Face model directory")
        server = ServerProcess(model_dir, out_dir / "server.log", args.server_args)
        print(f"fitserve bench: starting `{' '.join(server.command)}`", file=sys.stderr)
        server.start(args.server_start_timeout)
        base_url, local, server_pid = server.base_url, True, server.pid
    try:
        return _bench_against(args, workload, base_url, model_dir, local, server_pid, out_dir, server is not None)
    finally:
        if server is not None:
            server.stop()


def _bench_against(args, workload: WorkloadConfig, base_url: str, model_dir: Path | None, local: bool,
                   server_pid: int | None, out_dir: Path, launched: bool) -> int:
    from fitserve.bench.client import ClientOptions, StreamClient, fetch_model_name
    from fitserve.bench.environment import describe_environment
    from fitserve.bench.hardware import HardwareSampler
    from fitserve.bench.roofline import combine_limits
    from fitserve.bench.runner import BenchContext, LoadPlan, attach_roofline, build_report, execute_plan
    from fitserve.bench.workload import PromptMaker

    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else model_dir
    prompt_maker = PromptMaker(_load_tokenizer(tokenizer_dir))
    model_name = args.served_model_name or asyncio.run(fetch_model_name(base_url, api_key=args.api_key))
    endpoint = args.endpoint if args.endpoint != "auto" else ("chat" if workload.kind == "multi-turn" else "completions")
    client = StreamClient(ClientOptions(base_url=base_url, model=model_name, endpoint=endpoint,
                                        request_timeout_s=args.request_timeout, ignore_eos=args.ignore_eos,
                                        temperature=args.temperature, api_key=args.api_key))
    shape, device = _model_shape(args, model_dir) if local else (None, None)
    limit_before = _measure_limit(args, shape, device)
    sampler = HardwareSampler(server_pid, args.sample_interval) if (local and args.hardware) else None
    idle_samples = []
    if sampler is not None and args.idle_seconds > 0:
        print(f"fitserve bench: idle baseline for {args.idle_seconds:g} s…", file=sys.stderr)
        idle_samples = sampler.measure_idle(args.idle_seconds)
    context = BenchContext(client, workload, prompt_maker, sampler, idle_samples, shape, None, args.progress)
    plan = LoadPlan(rates=args.rate, max_concurrency=args.concurrency, burstiness=args.burstiness,
                    seed=args.seed, slo=args.slo, search=args.slo_search, search_steps=args.search_steps)
    runs, slo_search = execute_plan(context, plan)
    # Measured again after the load: the higher of the two is the better estimate of a peak.
    context.hardware_limit = combine_limits(limit_before, _measure_limit(args, shape, device) if limit_before else None)
    attach_roofline(runs, shape, context.hardware_limit)
    server_info = {"url": base_url, "model_name": model_name, "endpoint": endpoint,
                   "launched_by_bench": launched, "model_dir": str(model_dir) if model_dir else None,
                   "server_args": args.server_args if launched else None, "local": local,
                   "pid_sampled": server_pid,
                   "counters": sampler.describe_sources() if sampler else "not sampled (remote server or --no-hardware)"}
    from fitserve.bench.report import print_summary, write_all  # matplotlib: only when writing

    command = getattr(args, "command_line", None) or sys.argv
    environment = describe_environment(sampler.nvml.names if sampler else None)
    report = build_report(command, environment, server_info, context, plan, runs, slo_search)
    paths = write_all(report, out_dir)
    print_summary(report)
    print("fitserve bench: wrote " + ", ".join(str(path) for path in paths.values()), file=sys.stderr)
    return 0 if all(run["summary"]["completed"] > 0 for run in runs) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fitserve")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    bench_argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(["bench", *bench_argv])
    args.command_line = ["fitserve", "bench", *bench_argv]
    try:
        return int(args.func(args) or 0)
    except ValueError as error:
        print(f"fitserve bench: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

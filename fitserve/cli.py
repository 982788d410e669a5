"""`fitserve generate | chat | serve | bench | quantize` — the command-line entry point."""

from __future__ import annotations

import argparse
import logging
import sys

from fitserve import __version__
from fitserve.bench.cli import add_bench_parser
from fitserve.cli_args import (HelpFormatter, add_engine_arguments, add_model_arguments, engine_args_from,
                               resolve_model_argument)
from fitserve.quant.cli import add_quantize_parser
from fitserve.server.cli import add_serve_parser


def add_sampling_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=64, help="most tokens to generate")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    group.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens with this total probability")
    group.add_argument("--top-k", type=int, default=-1, help="sample from the k most likely tokens; -1: all")
    group.add_argument("--min-p", type=float, default=0.0, help="drop tokens less likely than this times the most likely one")
    group.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already in the text")
    group.add_argument("--presence-penalty", type=float, default=0.0, help="subtracted from tokens already generated")
    group.add_argument("--frequency-penalty", type=float, default=0.0,
                       help="subtracted per occurrence of a token already generated")
    group.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    group.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    group.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def sampling_params_from(namespace: argparse.Namespace):
    from fitserve.sampling_params import SamplingParams

    return SamplingParams(
        max_tokens=namespace.max_tokens,
        temperature=namespace.temperature,
        top_p=namespace.top_p,
        top_k=namespace.top_k,
        min_p=namespace.min_p,
        repetition_penalty=namespace.repetition_penalty,
        presence_penalty=namespace.presence_penalty,
        frequency_penalty=namespace.frequency_penalty,
        seed=namespace.sampling_seed,
        stop=namespace.stop,
        ignore_eos=namespace.ignore_eos,
    )


def run_generate(args: argparse.Namespace) -> int:
    from fitserve.engine.engine import LLMEngine

    resolve_model_argument(args)
    engine = LLMEngine(engine_args_from(args))
    params = sampling_params_from(args)
    for index, prompt in enumerate(args.prompt):
        engine.add_request(str(index), prompt, params)
    results = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                results[int(output.request_id)] = output
    for index in sorted(results):
        output = results[index]
        if len(args.prompt) > 1:
            print(f"--- prompt {index} ({output.outputs[0].finish_reason})")
        print(output.prompt + output.outputs[0].text if args.echo else output.outputs[0].text)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from fitserve.chat import chat_loop

    resolve_model_argument(args)
    return chat_loop(engine_args_from(args), sampling_params_from(args), system_prompt=args.system)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitserve",
        description="Run, serve and measure Llama-family LLMs on the hardware you have.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fitserve {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    generate = subparsers.add_parser("generate", help="complete one or more prompts and print the text",
                                     formatter_class=HelpFormatter)
    generate.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    generate.add_argument("--echo", action="store_true", help="print the prompt before its continuation")
    add_model_arguments(generate)
    add_engine_arguments(generate, model_flag=False)
    add_sampling_arguments(generate)
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="talk to the model in the terminal (streams tokens)",
                                 formatter_class=HelpFormatter)
    chat.add_argument("--system", default=None, help="system prompt")
    add_model_arguments(chat)
    add_engine_arguments(chat, model_flag=False)
    add_sampling_arguments(chat)
    chat.set_defaults(func=run_chat, max_tokens=256)

    add_serve_parser(subparsers)
    add_bench_parser(subparsers)
    add_quantize_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = getattr(logging, str(args.log_level).upper(), None)
    if not isinstance(level, int):
        parser.error(f"--log-level must be DEBUG, INFO, WARNING or ERROR (got {args.log_level!r})")
    logging.getLogger("fitserve").setLevel(level)
    from fitserve.config import ConfigError
    from fitserve.models.config import ModelLoadError

    try:
        return int(args.func(args) or 0)
    except (ConfigError, ModelLoadError, ValueError) as error:
        print(f"fitserve: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

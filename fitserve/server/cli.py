"""`fitserve serve [MODEL_DIR]`: load a model and serve it over OpenAI's HTTP API.

The socket is bound before uvicorn starts so that the banner can print the real address
(also with `--port 0`, which tests use to get a free port) and so that a port already in
use is a one-line error instead of a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from fitserve.cli_args import (HelpFormatter, add_engine_arguments, add_model_arguments, engine_args_from,
                               resolve_model_argument)
from fitserve.config import ConfigError, parse_size

API_KEY_ENV = "FITSERVE_API_KEY"


def port_number(text: str) -> int:
    """argparse type for --port: an int in 0..65535 (the OS would silently wrap larger ones)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 65535 (got {text!r})") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (got {port}); 0 picks a free port")
    return port


def positive_int(text: str) -> int:
    """argparse type for counts that must be at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {text!r})") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1 (got {value})")
    return value


class _SignalExit(Exception):
    """SIGTERM arrived; raised only after uvicorn finished its graceful shutdown."""


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on the `fitserve` command's subparsers."""
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model over an OpenAI-compatible HTTP API (/v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics).",
        formatter_class=HelpFormatter,
    )
    add_model_arguments(parser)
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    server.add_argument("--port", type=port_number, default=8000, help="port to listen on (0 picks a free one)")
    server.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (or set {API_KEY_ENV})")
    server.add_argument("--api-keys-file", default=None, metavar="PATH",
                        help="accepted keys, one 'KEY TENANT [WEIGHT]' per line: the tenant is the client "
                             "that --scheduling-policy vtc shares service between (it wins over the 'user' "
                             "field), the weight its share")
    server.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="model name(s) clients use; the first is reported (default: MODEL_DIR as given)")
    server.add_argument("--max-request-body-bytes", type=parse_size, default="1MiB", metavar="SIZE",
                        help="larger request bodies get HTTP 413 (units like 4MiB work)")
    server.add_argument("--max-choices-per-request", type=positive_int, default=1024, metavar="N",
                        help="most completions one request may ask for (prompts x n); more get HTTP 400. "
                             "A request's choices enter the queue interleaved with other requests' work")
    server.add_argument("--shutdown-timeout", type=float, default=10.0, metavar="SECONDS",
                        help="on Ctrl-C/SIGTERM, how long in-flight requests may finish before they are aborted")
    server.add_argument("--uvicorn-log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                        help="log level of the HTTP server (debug also logs every request)")
    add_engine_arguments(parser, model_flag=False)
    parser.set_defaults(func=run_serve)
    return parser


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _raise_signal_exit(signum: int, frame: Any) -> None:
    raise _SignalExit()


def run_serve(args: argparse.Namespace) -> int:
    """Load the engine, bind, serve until Ctrl-C or SIGTERM; returns the exit status."""
    try:
        resolve_model_argument(args)
    except ConfigError as error:
        print(f"fitserve serve: error: {error}", file=sys.stderr)
        return 2
    # Bind before loading the model (as vLLM does): a bad host or a port in use is reported
    # at once, not after a load that can take minutes, and nobody can take the port meanwhile.
    try:
        sock = _bind(args.host, args.port)
    except OSError as error:
        print(f"fitserve serve: error: cannot listen on {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    import uvicorn  # heavy imports only when actually serving

    from fitserve.engine.async_engine import AsyncLLMEngine
    from fitserve.engine.engine import LLMEngine
    from fitserve.models.config import ModelLoadError
    from fitserve.server.api_keys import load_api_keys_file
    from fitserve.server.app import build_app
    from fitserve.server.serving_common import ServerSettings
    from fitserve.server.shutdown import DrainingServer

    try:
        api_keys = load_api_keys_file(args.api_keys_file) if args.api_keys_file else None
        engine_args = engine_args_from(args)
        if api_keys is not None and api_keys.weights:
            engine_args = dataclasses.replace(engine_args, client_weights=api_keys.weights)
        print(f"fitserve serve: loading {engine_args.model_dir} ...", flush=True)
        engine = LLMEngine(engine_args)
    except (ConfigError, ModelLoadError, OSError) as error:
        sock.close()
        print(f"fitserve serve: error: {error}", file=sys.stderr)
        return 2

    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host
    model_path = str(engine_args.model_dir)
    names = args.served_model_name or [args.model or Path(model_path).name]
    settings = ServerSettings(
        served_model_names=names, api_key=args.api_key or os.environ.get(API_KEY_ENV) or None, api_keys=api_keys,
        max_request_body_bytes=args.max_request_body_bytes, model_path=model_path,
        max_choices_per_request=args.max_choices_per_request,
    )
    kv_tokens = engine.num_kv_blocks * engine.block_size
    print(
        f"fitserve serve: listening on http://{shown_host}:{port}\n"
        f"  model   {names[0]}{'' if names[0] == model_path else f' ({model_path})'}\n"
        f"  dtype   {str(engine.dtype).removeprefix('torch.')}   device {engine.device}\n"
        f"  KV cache {kv_tokens} tokens ({engine.num_kv_blocks} blocks x {engine.block_size}), "
        f"max model len {engine.max_model_len}\n"
        f"  API key {'required' if settings.api_key or api_keys else 'not required'}"
        f"{f' ({len(api_keys.tenants)} keys from --api-keys-file)' if api_keys else ''}\n"
        f"  scheduling policy {engine_args.scheduling_policy}",
        flush=True,
    )

    async_engine = AsyncLLMEngine(engine)
    app = build_app(async_engine, settings)
    config = uvicorn.Config(app, log_level=args.uvicorn_log_level, access_log=args.uvicorn_log_level == "debug")
    # uvicorn re-raises the signal that stopped it once it is done; turn that into a clean exit.
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_signal_exit)
    try:
        DrainingServer(config, async_engine, args.shutdown_timeout).run(sockets=[sock])
    except (KeyboardInterrupt, _SignalExit):
        pass
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
        sock.close()
    print("fitserve serve: stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (`python -m fitserve.server.cli serve ...`)."""
    parser = argparse.ArgumentParser(prog="fitserve")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serve_parser(subparsers)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

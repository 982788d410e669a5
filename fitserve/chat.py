"""`fitserve chat`: an interactive conversation in the terminal, streamed token by token."""

from __future__ import annotations

import itertools
import sys

from fitserve.config import EngineArgs
from fitserve.sampling_params import SamplingParams


def chat_loop(engine_args: EngineArgs, params: SamplingParams, system_prompt: str | None = None) -> int:
    """Read a line, stream the reply, repeat; the whole conversation is the next prompt.

    Each turn re-sends the conversation; the prefix cache makes the earlier turns nearly free.
    Ends on EOF (Ctrl-D), `/exit` or Ctrl-C.
    """
    from fitserve.engine.engine import LLMEngine

    engine = LLMEngine(engine_args)
    tokenizer = engine.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        print("fitserve: error: this model has no chat template; use `fitserve generate`", file=sys.stderr)
        return 2
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    counter = itertools.count()
    print("fitserve chat — type a message, /reset to start over, /exit or Ctrl-D to quit.", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if system_prompt else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        token_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        request_id = str(next(counter))
        try:
            engine.add_request(request_id, {"prompt_token_ids": token_ids}, params)
        except ValueError as error:
            print(f"fitserve: {error}", file=sys.stderr)
            messages.pop()
            continue
        reply = _stream_reply(engine, request_id)
        messages.append({"role": "assistant", "content": reply})


def _stream_reply(engine, request_id: str) -> str:
    printed = ""
    try:
        while engine.has_unfinished_requests():
            for output in engine.step():
                if output.request_id != request_id:
                    continue
                text = output.outputs[0].text
                sys.stdout.write(text[len(printed):])
                sys.stdout.flush()
                printed = text
    except KeyboardInterrupt:
        engine.abort_request(request_id)
        while engine.has_unfinished_requests():
            engine.step()
    sys.stdout.write("\n")
    return printed

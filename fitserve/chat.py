"""`fitserve chat`: an interactive conversation in the terminal, streamed token by token.

A line that starts with `/` is a command for the chat itself and never goes to the model
(`//text` sends `/text`). Lines are read with readline where Python has it (arrow keys edit
the line and walk the history). While a reply streams, the terminal does not echo keys and
drops what was typed afterwards, so stray keys neither land in the reply nor become the next
message unseen.
"""

from __future__ import annotations

import contextlib
import itertools
import sys
from collections.abc import Iterator

from fitserve.config import EngineArgs
from fitserve.sampling_params import SamplingParams

HELP = """commands:
  /help         this list
  /reset        forget the conversation (the system prompt stays)
  /exit, /quit  leave (Ctrl-D too); Ctrl-C stops a reply early
  //text        send a message that starts with "/"
editing: arrow keys move in the line and through earlier messages (readline)"""


def parse_line(line: str) -> tuple[str, str]:
    """("message", text), ("command", name) or ("empty", "") for one line the user typed."""
    stripped = line.strip()
    if not stripped:
        return "empty", ""
    if stripped.startswith("//"):
        return "message", stripped[1:]
    if stripped.startswith("/"):
        return "command", stripped.split()[0].lower()
    return "message", line


def enable_line_editing() -> bool:
    """Load readline, which gives `input()` line editing and history; False where there is none."""
    try:
        import readline  # noqa: F401  (importing it is what turns editing on)
    except ImportError:  # e.g. Windows without pyreadline
        return False
    return True


@contextlib.contextmanager
def keys_held_back(stream=None) -> Iterator[None]:
    """While the body runs, keys typed on the terminal are not echoed; on exit, whatever was
    typed meanwhile is discarded. Ctrl-C still interrupts. A no-op when not on a terminal."""
    stream = stream if stream is not None else sys.stdin
    try:
        import termios
    except ImportError:  # Windows
        yield
        return
    try:
        fd = stream.fileno()
        saved = termios.tcgetattr(fd)
    except (termios.error, OSError, ValueError, AttributeError):  # not a terminal (pipe, file, test)
        yield
        return
    quiet = list(saved)
    quiet[3] &= ~termios.ECHO  # local modes: stop echoing, keep signals (Ctrl-C) and line mode
    termios.tcsetattr(fd, termios.TCSANOW, quiet)
    try:
        yield
    finally:
        termios.tcflush(fd, termios.TCIFLUSH)
        termios.tcsetattr(fd, termios.TCSANOW, saved)


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
    enable_line_editing()
    messages: list[dict[str, str]] = []
    if system_prompt:
        messages.append({"role": "system", "content": system_prompt})
    counter = itertools.count()
    print("fitserve chat — type a message; /help lists the commands, /exit or Ctrl-D quits.", file=sys.stderr)
    while True:
        try:
            kind, text = parse_line(input("> "))
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if kind == "empty":
            continue
        if kind == "command":
            if text in ("/exit", "/quit"):
                return 0
            if text == "/reset":
                messages = messages[:1] if system_prompt else []
                print("(conversation forgotten)", file=sys.stderr)
            elif text == "/help":
                print(HELP, file=sys.stderr)
            else:
                print(f"unknown command {text}; /help lists them (//text sends a message starting with /)",
                      file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        token_ids = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
        request_id = str(next(counter))
        try:
            engine.add_request(request_id, {"prompt_token_ids": token_ids}, params)
        except ValueError as error:
            print(f"fitserve: {error}", file=sys.stderr)
            messages.pop()
            continue
        with keys_held_back():
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

"""`fitserve chat` as a user types into it: commands stay out of the conversation, lines are
editable, and keys typed during a reply neither show in it nor become the next message."""

from __future__ import annotations

import os
import pty
import termios

import pytest

from fitserve import chat
from fitserve.config import EngineArgs
from fitserve.sampling_params import SamplingParams


def test_commands_are_never_sent_to_the_model() -> None:
    assert chat.parse_line("/help") == ("command", "/help")
    assert chat.parse_line("  /RESET  ") == ("command", "/reset")
    assert chat.parse_line("/whatever else") == ("command", "/whatever")
    assert chat.parse_line("//etc/hosts is a file") == ("message", "/etc/hosts is a file")
    assert chat.parse_line("hello /help") == ("message", "hello /help")
    assert chat.parse_line("   ") == ("empty", "")


def test_chat_loop_answers_help_itself_and_sends_only_messages(monkeypatch, capsys) -> None:
    from fitserve.engine.engine import LLMEngine

    lines = iter(["/help", "/nonsense", "def", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    prompts: list[list[int]] = []
    original_add = LLMEngine.add_request

    def add_request(self, request_id, prompt, params=None, *args, **kwargs):
        prompts.append(prompt["prompt_token_ids"])
        return original_add(self, request_id, prompt, params, *args, **kwargs)

    monkeypatch.setattr(LLMEngine, "add_request", add_request)
    code = chat.chat_loop(EngineArgs(device="cpu", kv_cache_memory="8MiB"), SamplingParams(max_tokens=3))
    assert code == 0
    err = capsys.readouterr().err
    assert "/reset" in err and "forget the conversation" in err  # the help text
    assert "unknown command /nonsense" in err
    assert len(prompts) == 1  # only "def" reached the model


def test_line_editing_is_on() -> None:
    import sys

    assert chat.enable_line_editing() is True  # this test machine's Python has readline
    assert "readline" in sys.modules


def test_keys_typed_during_a_reply_are_not_echoed_and_then_dropped() -> None:
    controller, terminal = pty.openpty()
    try:
        with open(terminal, "rb", buffering=0, closefd=False) as stream:
            assert termios.tcgetattr(terminal)[3] & termios.ECHO
            with chat.keys_held_back(stream):
                assert not termios.tcgetattr(terminal)[3] & termios.ECHO
                os.write(controller, b"typed meanwhile\n")
            assert termios.tcgetattr(terminal)[3] & termios.ECHO  # restored
            os.set_blocking(terminal, False)
            with pytest.raises(BlockingIOError):
                os.read(terminal, 100)  # nothing left to become the next message
    finally:
        os.close(controller)
        os.close(terminal)


def test_keys_held_back_is_harmless_off_a_terminal(tmp_path) -> None:
    with open(tmp_path / "file", "w+") as not_a_terminal, chat.keys_held_back(not_a_terminal):
        pass

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


class _RecordingEngine:
    """Stands in for LLMEngine: records what reaches the model and answers nothing."""

    prompts: list[list[dict]] = []

    def __init__(self, engine_args) -> None:
        self.tokenizer = self

    chat_template = "a template"

    def apply_chat_template(self, messages, **kwargs):
        _RecordingEngine.prompts.append([dict(message) for message in messages])
        return [1, 2, 3]

    def add_request(self, request_id, prompt, params) -> None:
        pass

    def has_unfinished_requests(self) -> bool:
        return False


def test_chat_loop_answers_help_itself_and_sends_only_messages(monkeypatch, capsys) -> None:
    from fitserve.engine import engine

    lines = iter(["/help", "/nonsense", "def", "//etc", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    monkeypatch.setattr(engine, "LLMEngine", _RecordingEngine)
    _RecordingEngine.prompts = []
    assert chat.chat_loop(EngineArgs(), SamplingParams(max_tokens=3)) == 0
    err = capsys.readouterr().err
    assert "/reset" in err and "forget the conversation" in err  # the help text
    assert "unknown command /nonsense" in err
    # Only the two messages reached the model ("//etc" sends "/etc").
    assert [prompt[-1]["content"] for prompt in _RecordingEngine.prompts] == ["def", "/etc"]


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

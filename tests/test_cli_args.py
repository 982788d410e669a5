"""The command line: engine flags derived from `EngineArgs` (one source of truth), --version,
and a --help that answers without loading torch."""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
from typing import Literal

import pytest

from fitserve import __version__
from fitserve.cli import build_parser
from fitserve.cli_args import HelpFormatter, add_engine_arguments, engine_args_from, field_docs
from fitserve.config import ConfigError, EngineArgs


def engine_parser(args_class: type = EngineArgs) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_engine_arguments(parser, args_class=args_class)
    return parser


def test_every_engine_field_is_documented_and_has_a_flag() -> None:
    docs = field_docs(EngineArgs)
    flags = {option for action in engine_parser()._actions for option in action.option_strings}
    for field in dataclasses.fields(EngineArgs):
        assert docs.get(field.name), f"EngineArgs.{field.name} needs a docstring (it is the flag's help)"
        assert ("--" + field.name.replace("_", "-") in flags) == field.metadata.get("cli", True), field.name


def test_flag_defaults_are_the_fields_defaults() -> None:
    assert engine_args_from(engine_parser().parse_args([])) == EngineArgs()


def test_flags_reach_the_fields_with_vllm_spellings() -> None:
    args = engine_args_from(engine_parser().parse_args([
        "--max-num-seqs", "7", "--no-enable-prefix-caching", "--enforce-eager", "--kv-cache-memory", "2GiB",
        "--attention-backend", "torch", "--gpu-memory-utilization", "0.5", "--max-model-len", "64"]))
    assert (args.max_num_seqs, args.enable_prefix_caching, args.enforce_eager) == (7, False, True)
    assert (args.kv_cache_memory, args.attention_backend, args.gpu_memory_utilization) == ("2GiB", "torch", 0.5)
    assert args.max_model_len == 64


def test_literal_annotation_gives_choices_and_is_validated(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        engine_parser().parse_args(["--attention-backend", "cuda"])
    assert "invalid choice: 'cuda'" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="attention_backend must be auto, torch or triton"):
        EngineArgs(attention_backend="cuda")


def test_help_shows_each_fields_docstring_and_default() -> None:
    text = " ".join(engine_parser().format_help().split())
    assert "--max-num-seqs MAX_NUM_SEQS Most requests running at once. (default: 128)" in text
    assert "--enable-prefix-caching, --no-enable-prefix-caching" in text
    assert "{auto,torch,triton}" in text


@dataclasses.dataclass
class _ArgsWithNewFields(EngineArgs):
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    """Data type of the KV cache."""
    quantization: str | None = None
    """Weight quantization method."""
    use_new_thing: bool = True
    """A default-on switch."""
    capture_sizes: list[int] | None = None
    """Batch sizes to capture."""
    cache_dtype: "str | torch.dtype" = "auto"
    """Annotated with a type only type checkers resolve here (torch is not imported)."""


def test_a_new_documented_field_gets_its_flag_without_an_edit() -> None:
    parser = engine_parser(_ArgsWithNewFields)
    args = engine_args_from(parser.parse_args(["--kv-cache-dtype", "fp8", "--quantization", "w8",
                                               "--no-use-new-thing", "--block-size", "32", "--capture-sizes", "1", "8",
                                               "--cache-dtype", "bfloat16"]), _ArgsWithNewFields)
    assert (args.kv_cache_dtype, args.quantization, args.use_new_thing, args.block_size) == ("fp8", "w8", False, 32)
    assert (args.capture_sizes, args.cache_dtype) == ([1, 8], "bfloat16")
    text = " ".join(parser.format_help().split())
    assert "--kv-cache-dtype {auto,fp8} Data type of the KV cache. (default: auto)" in text


def test_every_flag_of_every_command_has_help() -> None:
    parser = build_parser()
    commands = next(action for action in parser._actions if isinstance(action, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"fitserve {name} {action.option_strings[0]} has no help text"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    # A fresh interpreter: whether torch is loaded must not depend on other tests.
    code = ("import sys\nfrom fitserve.cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('torch loaded' if 'torch' in sys.modules else 'torch not loaded')")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["bench", "--help"], ["generate", "--help"]])
def test_help_does_not_import_torch(args: list[str]) -> None:
    result = run_cli(*args)
    assert "usage: fitserve" in result.stdout
    assert result.stdout.strip().endswith("torch not loaded"), result.stdout[-300:]


def test_version() -> None:
    result = run_cli("--version")
    assert result.stdout.startswith(f"fitserve {__version__}\n")

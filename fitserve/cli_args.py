"""Command-line flags derived from `EngineArgs`, shared by `generate`, `chat`, `serve` and `bench`.

Nothing here restates a setting: each documented field of `EngineArgs` becomes one flag,
`--field-name` (vLLM's spelling, since vLLM derives its flags from its own EngineArgs the same
way), with the field's default, its docstring as the help text, the values of a `Literal`
annotation as choices, and `--field-name / --no-field-name` for booleans. A field added to
`EngineArgs` appears on every command without an edit here.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from functools import cache
from typing import Any, Literal

from fitserve.config import ConfigError, EngineArgs, field_types


@cache
def field_docs(cls: type = EngineArgs) -> dict[str, str]:
    """Each dataclass field's docstring (the string literal right under it), whitespace folded;
    a subclass's own docstrings win over its bases'.

    Python keeps no such docstrings at run time, so they are read from the classes' source.
    """
    docs: dict[str, str] = {}
    for klass in reversed([klass for klass in cls.__mro__ if dataclasses.is_dataclass(klass)]):
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for statement, following in zip(body, body[1:]):
            if (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
                    and isinstance(following.value.value, str)):
                docs[statement.target.id] = " ".join(following.value.value.split())
    return docs


def _flag_type(annotation: Any) -> tuple[Any, tuple | None, str | None]:
    """(argparse type, choices, nargs) for a field's annotation: `X | None` is X, `list[X]` takes
    one or more values, and a union of several types (such as `str | int` for sizes) or a type
    only a type checker knows is read as text for the field to parse."""
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, None
    if origin in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        return _flag_type(members[0]) if len(members) == 1 else (str, None, None)
    if origin in (list, tuple) and typing.get_args(annotation):
        element_type, choices, _ = _flag_type(typing.get_args(annotation)[0])
        return element_type, choices, "+"
    if annotation in (int, float, str):
        return annotation, None, None
    return str, None, None




def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The model directory as a positional MODEL_DIR or as --model (vLLM's spelling); neither
    means the bundled model. Pair with `add_engine_arguments(parser, model_flag=False)` and
    `resolve_model_argument`."""
    parser.add_argument("model_dir", nargs="?", default=None, metavar="MODEL_DIR",
                        help="Hugging Face model directory (default: the bundled model)")
    parser.add_argument("--model", dest="model_flag", default=None, metavar="MODEL_DIR",
                        help="same as the positional MODEL_DIR, for vLLM-style command lines")


def resolve_model_argument(namespace: argparse.Namespace) -> None:
    """Set `namespace.model` from MODEL_DIR or --model; both given and different is an error."""
    if namespace.model_dir and namespace.model_flag and namespace.model_dir != namespace.model_flag:
        raise ConfigError(f"MODEL_DIR {namespace.model_dir!r} and --model {namespace.model_flag!r} disagree; "
                          "give one of them")
    namespace.model = namespace.model_dir or namespace.model_flag


def add_engine_arguments(parser: argparse.ArgumentParser, model_flag: bool = True,
                         args_class: type = EngineArgs) -> None:
    """Add one flag per documented field of `args_class` (`model_flag=False` leaves out --model,
    for commands that take the model directory as a positional argument)."""
    group = parser.add_argument_group("engine", "settings of the inference engine (fitserve.EngineArgs)")
    hints = field_types(args_class)
    docs = field_docs(args_class)
    for field in dataclasses.fields(args_class):
        if field.name not in docs or (field.name == "model" and not model_flag) or not field.metadata.get("cli", True):
            continue
        flag = "--" + field.name.replace("_", "-")
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        help_text = docs[field.name].replace("%", "%%")  # HelpFormatter appends the default
        if hints[field.name] is bool:
            group.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_text)
            continue
        flag_type, choices, nargs = _flag_type(hints[field.name])
        group.add_argument(flag, dest=field.name, type=flag_type, choices=choices, default=default, nargs=nargs,
                           metavar=None if choices else field.name.upper(), help=help_text)


def engine_args_from(namespace: argparse.Namespace, args_class: type = EngineArgs) -> Any:
    """Build `EngineArgs` from parsed flags (ignores flags that are not engine settings)."""
    values = vars(namespace)
    names = [field.name for field in dataclasses.fields(args_class)]
    return args_class(**{name: values[name] for name in names if name in values})


class HelpFormatter(argparse.HelpFormatter):
    """Help that shows each flag's default, unless it is unset (None) or an on/off switch
    whose name already says what it changes."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if "%(default)" in help_text or action.default in (None, argparse.SUPPRESS) \
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)) \
                or not action.option_strings:
            return help_text
        return f"{help_text} (default: %(default)s)".lstrip()

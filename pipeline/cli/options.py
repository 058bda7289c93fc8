"""Command-line options generated from pydantic models: one flag per field, named after it, with
the field's description and default as its help, so a field added to a config is a flag at once.

    add_model_options(parser, InversionConfig, aliases={"learning_rate": ["--lr"]})
    values = given_values(args, InversionConfig)   # only what was given on the command line

- ``--field-name`` for ``field_name``; aliases may add short or singular names;
- booleans are ``--flag`` / ``--no-flag``, so a flag can turn off what a file turned on;
- lists are repeatable flags (``--edit-word green --edit-word purple``), one value each, so a value
  may contain commas and spaces (a prompt, a caption template);
- a ``Literal`` becomes ``choices``; numbers are parsed by argparse, everything is validated by the
  model afterwards, so errors name the field.

Nothing given means nothing set (argparse's SUPPRESS): a config file or recipe keeps its value
unless a flag names the field.
"""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic_core import PydanticUndefined


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def _scalar(annotation: Any) -> tuple[Any, bool]:
    """The scalar type behind an annotation, and whether it is a list (``X | None`` counts as X;
    a union of a Literal and a list, like ``templates``, counts as a list of strings)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        lists = [a for a in args if typing.get_origin(a) is list]
        return _scalar(lists[0] if lists else args[0])
    if origin is list:
        return typing.get_args(annotation)[0], True
    return annotation, False


def _default_text(info: Any) -> str:
    if info.default_factory is not None:
        value = info.default_factory()
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if value is None or value == []:
        return "none"
    if value == "":
        return "empty"
    if isinstance(value, list):
        return " ".join(map(str, value))
    return str(value)


def add_model_options(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    aliases: dict[str, list[str]] | None = None,
    skip: set[str] = frozenset(),
    required: set[str] = frozenset(),
) -> None:
    """Adds one option per field of ``model`` (see the module docstring)."""
    aliases = aliases or {}
    for name, info in model.model_fields.items():
        if name in skip:
            continue
        scalar, is_list = _scalar(info.annotation)
        names = [flag(name), *aliases.get(name, [])]
        description = (info.description or name.replace("_", " ")).replace("%", "%%")
        says_default = name in required or "(default:" in description
        help_text = description if says_default else f"{description} (default: {_default_text(info)})"
        if is_list:
            help_text += " (repeatable)"
        options: dict[str, Any] = {"dest": name, "help": help_text, "default": argparse.SUPPRESS}
        if name in required:
            options.update(required=True, default=None)
        if scalar is bool and not is_list:
            options["action"] = argparse.BooleanOptionalAction
        else:
            if typing.get_origin(scalar) is Literal and not is_list:
                options["choices"] = list(typing.get_args(scalar))
            elif scalar in (int, float):
                options["type"] = scalar
            options["metavar"] = name.upper().removesuffix("S") if is_list or scalar is str else scalar.__name__.upper()
            if "choices" in options:
                options.pop("metavar")
            if is_list:
                options["action"] = "append"
        parser.add_argument(*names, **options)


def given_values(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` that the command line set."""
    return {name: value for name, value in vars(args).items() if name in model.model_fields}

"""Named recipes: good settings as data, a YAML file of ``InversionConfig`` fields.

The shipped ones live in ``pipeline/assets/recipes/NAME.yaml``; each says in its comments what it
is for and where its numbers come from. A recipe is the starting point of a config: a config
file's fields override it, and explicit options override both. The recipe's name (or path) is
recorded in the config's ``recipe`` field, so every result says what it started from.

    config = resolve_config(recipe="shapesworld", flags={"class_word": "shape", "seed": 3})
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.engine.config import ConfigError, InversionConfig, make_config

SHIPPED = resources.files("pipeline").joinpath("assets", "recipes")


def recipe_names() -> list[str]:
    """The shipped recipes, by name."""
    return sorted(p.name.removesuffix(".yaml") for p in SHIPPED.iterdir() if p.name.endswith(".yaml"))


def recipe_text(recipe: str) -> str:
    """A recipe file's text: a shipped name, or the path of a YAML file."""
    if recipe in recipe_names():
        return SHIPPED.joinpath(f"{recipe}.yaml").read_text()
    path = Path(recipe).expanduser()
    if not path.is_file():
        raise ConfigError(f"recipe {recipe!r}: not a shipped recipe ({', '.join(recipe_names())}) nor a file")
    return path.read_text()


def read_settings(text: str, source: str) -> dict[str, Any]:
    """A YAML/JSON mapping of config fields; unknown field names are refused here, naming the source."""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of field: value, got {type(data).__name__}")
    unknown = sorted(set(data) - set(InversionConfig.model_fields))
    if unknown:
        raise ConfigError(f"{source}: {', '.join(unknown)}: not a training config field")
    return data


def load_recipe(recipe: str) -> dict[str, Any]:
    """A recipe's fields, with ``recipe`` set to its name (or path)."""
    values = read_settings(recipe_text(recipe), f"recipe {recipe}")
    values.pop("recipe", None)
    return {**values, "recipe": recipe}


def resolve_config(
    recipe: str | None = None,
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    source: str = "options",
) -> InversionConfig:
    """Recipe, then config file, then explicit flags, each overriding the one before. The recipe is
    the one the flags name, else the file's ``recipe:``."""
    file_values: dict[str, Any] = {}
    if config_file is not None:
        try:
            text = Path(config_file).read_text()
        except OSError as err:
            raise ConfigError(f"{config_file}: cannot read config: {err.strerror}") from None
        file_values = read_settings(text, str(config_file))
        source = str(config_file)
    flags = flags or {}
    recipe = recipe or flags.get("recipe") or file_values.get("recipe")
    values = {**(load_recipe(recipe) if recipe else {}), **file_values, **flags}
    return make_config(values, source)

"""The training options are generated from the config: every field one flag, both directions."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

from pipeline.cli.main import _parser
from pipeline.cli.options import add_model_options, flag, given_values
from pipeline.engine.config import ConfigError, InversionConfig
from pipeline.engine.recipes import resolve_config

REQUIRED = ["train", "--images", "x", "--name", "n", "--base-model", "m", "--out", "o"]


def train_config(*argv: str, config_file: Path | None = None) -> InversionConfig:
    args = _parser().parse_args([*REQUIRED, *argv])
    return resolve_config(config_file=config_file, flags=given_values(args, InversionConfig))


def test_every_config_field_has_its_flag_with_help_and_default():
    train = _parser()._subparsers._group_actions[0].choices["train"]
    by_dest = {a.dest: a for a in train._actions}
    for name, info in InversionConfig.model_fields.items():
        assert name in by_dest, f"no flag for {name}"
        action = by_dest[name]
        assert flag(name) in action.option_strings
        assert info.description and info.description.split()[0] in action.help
        assert "(default: " in action.help and action.help.count("(default:") == 1


def test_nothing_given_sets_nothing():
    args = _parser().parse_args(REQUIRED)
    assert given_values(args, InversionConfig) == {}
    assert train_config() == InversionConfig()


def test_flags_override_the_file_in_both_directions(tmp_path: Path):
    on = tmp_path / "on.yaml"
    on.write_text(yaml.safe_dump({"scale_lr": True, "compile_unet": True, "steps": 5, "edit_words": ["red"],
                                  "edit_consistency": 0.5}))  # fmt: skip
    off = tmp_path / "off.yaml"
    off.write_text(yaml.safe_dump({"scale_lr": False, "steps": 5}))
    assert train_config(config_file=on).scale_lr is True
    assert train_config("--no-scale-lr", "--no-compile-unet", config_file=on).scale_lr is False
    assert train_config("--no-compile-unet", config_file=on).compile_unet is False
    assert train_config("--scale-lr", config_file=off).scale_lr is True
    assert train_config("--steps", "9", config_file=on).steps == 9
    # a repeated flag replaces the file's list, it does not extend it
    assert train_config("--edit-word", "blue", "--edit-words", "pink", config_file=on).edit_words == ["blue", "pink"]


def test_lists_repeat_and_keep_commas_and_sets_are_names():
    config = train_config("--progressive-steps", "20", "--progressive-steps", "40", "--steps", "50",
                          "--validation-prompt", "a photo of <n>, on a beach", "--template", "a {}, drawn",
                          "--template", "an old {}")  # fmt: skip
    assert config.progressive_steps == [20, 40]
    assert config.validation_prompts == ["a photo of <n>, on a beach"]
    assert config.templates == ["a {}, drawn", "an old {}"]
    assert train_config("--templates", "style").templates == "style"
    assert train_config("--lr", "0.01").learning_rate == train_config("--learning-rate", "0.01").learning_rate == 0.01


def test_recipe_flag_and_class_word(tmp_path: Path):
    config = train_config("--recipe", "shapesworld", "--class-word", "shape", "--seed", "4")
    assert (config.recipe, config.init_word, config.seed, config.steps) == ("shapesworld", "shape", 4, 200)
    assert config.edit_reference_words == ["circle", "square", "triangle", "ring"]
    assert train_config("--recipe", "shapesworld", "--class-word", "shape", "--steps", "20").steps == 20
    with pytest.raises(ConfigError, match="give the concept's class_word"):  # the recipe's search needs a class
        train_config("--recipe", "shapesworld")
    assert train_config("--recipe", "shapesworld", "--no-init-word-search").init_word == "object"


def test_generated_options_for_another_model():
    parser = argparse.ArgumentParser()
    add_model_options(parser, InversionConfig, skip={"recipe"}, required={"init_word"})
    with pytest.raises(SystemExit):
        parser.parse_args([])  # init_word is required here
    args = parser.parse_args(["--init-word", "dog", "--precision", "bf16"])
    assert given_values(args, InversionConfig) == {"init_word": "dog", "precision": "bf16"}
    with pytest.raises(SystemExit):
        parser.parse_args(["--init-word", "dog", "--precision", "fp8"])  # choices come from the Literal


def test_generate_speaks_the_http_apis_vocabulary():
    from serving.app import GenerateRequest

    generate = _parser()._subparsers._group_actions[0].choices["generate"]
    flags = {a.dest for a in generate._actions}
    api = set(GenerateRequest.model_fields) - {"output_format"}  # the CLI writes PNG files
    assert api - {"prompt"} <= flags and "prompt" in flags  # the prompt is the positional argument
    args = _parser().parse_args(["generate", "a <x>", "--base-model", "m", "--out", "o.png", "--n", "2",
                                 "--negative-prompt", "blurry", "--guidance-scale", "5", "--width", "32"])  # fmt: skip
    assert given_values(args, GenerateRequest) == {"prompt": "a <x>", "n": 2, "negative_prompt": "blurry",
                                                   "guidance_scale": 5.0, "width": 32}  # fmt: skip


def test_every_service_setting_is_a_serve_flag():
    from serving.settings import ServeSettings

    serve = _parser()._subparsers._group_actions[0].choices["serve"]
    by_dest = {a.dest: a for a in serve._actions}
    for name, info in ServeSettings.model_fields.items():
        assert flag(name) in by_dest[name].option_strings and info.description in by_dest[name].help
    args = _parser().parse_args(["serve", "--max-replicas", "4", "--precision", "bf16"])
    assert given_values(args, ServeSettings) == {"max_replicas": 4, "precision": "bf16"}

from pathlib import Path

import pytest

from pipeline.config import ConfigError, InversionConfig, load_config_file, make_config


def test_defaults_follow_the_paper_and_diffusers():
    config = InversionConfig()
    assert (config.learning_rate, config.steps, config.num_vectors, config.per_image_mix_prob) == (5e-3, 3000, 1, 0.25)
    assert config.effective_learning_rate == 5e-3


def test_paper_batch_size_scaling():
    config = InversionConfig(learning_rate=5e-3, batch_size=2, grad_accum=4, scale_lr=True)
    assert config.effective_learning_rate == pytest.approx(0.04)


@pytest.mark.parametrize(
    ("values", "field", "words"),
    [
        ({"steps": 0}, "steps", "greater than or equal to 1"),
        ({"learning_rate": -1}, "learning_rate", "greater than 0"),
        ({"batch_size": 0}, "batch_size", "greater than or equal to 1"),
        ({"flip_prob": 1.5}, "flip_prob", "less than or equal to 1"),
        ({"per_image_mix_prob": -0.1}, "per_image_mix_prob", "greater than or equal to 0"),
        ({"precision": "fp8"}, "precision", "'auto', 'fp32', 'bf16' or 'fp16'"),
        ({"init_word": "two words"}, "init_word", "single word"),
        ({"progressive_steps": [20, 10]}, "progressive_steps", "strictly increasing"),
        ({"templates": ["no slot here"]}, "templates", "exactly once"),
        ({"templates": []}, "templates", "must not be empty"),
        ({"known_attributes": ["{}"]}, "known_attributes", "letters, digits"),
        ({"known_attributes": ["<my-star>"]}, "known_attributes", "letters, digits"),
        ({"known_attributes": ["red"] * 9}, "known_attributes", "at most 8"),
        ({"known_attribute_share": 1.5}, "known_attribute_share", "less than or equal to 1"),
        ({"known_attribute_pull": -1e-3}, "known_attribute_pull", "greater than or equal to 0"),
        ({"known_attribute_pull": 4e-3}, "(top level)", "known_attribute_pull needs known_attributes"),
        ({"edit_words": ["green {}"]}, "edit_words", "edit word 'green {}' must be 1-40 letters"),
        ({"edit_words": ["red"] * 9}, "edit_words", "at most 8 edit words"),
        ({"edit_words": ["red"], "edit_consistency": -0.1}, "edit_consistency", "greater than or equal to 0"),
        ({"edit_consistency": 0.2}, "(top level)", "edit_consistency needs edit_words"),
        (
            {"edit_words": ["red"], "edit_consistency": 0.2, "edit_reference_words": ["ring?"]},
            "edit_reference_words",
            "edit reference word 'ring?' must be 1-40 letters",
        ),
        ({"edit_reference_words": ["ring"] * 9}, "edit_reference_words", "at most 8 edit reference words"),
        ({"edit_reference_words": ["ring"]}, "(top level)", "edit_reference_words needs edit_consistency"),
        ({"stepz": 10}, "stepz", "Extra inputs are not permitted"),
        ({"num_vectors": 74, "progressive_steps": [1, 2]}, "(top level)", "exceeds 75"),
        ({"steps": 100, "progressive_steps": [100]}, "(top level)", "not before the last step"),
    ],
)
def test_invalid_values_name_the_field(values, field, words):
    with pytest.raises(ConfigError) as err:
        make_config(values, source="my.yaml")
    assert f"my.yaml: {field}: " in str(err.value)
    assert words in str(err.value)


def test_config_file_and_overrides(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("steps: 123\nbatch_size: 4\nprogressive_steps: [50, 100]\n")
    config = load_config_file(path, {"batch_size": 2})
    assert (config.steps, config.batch_size, config.progressive_steps, config.total_vectors) == (123, 2, [50, 100], 3)


def test_config_file_errors_name_file_and_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: steps: Input should be a valid integer"):
        load_config_file(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        load_config_file(path)

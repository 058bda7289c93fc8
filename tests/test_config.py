from pathlib import Path

import pytest

from pipeline.engine.config import REFERENCE_MEMBERS, ConfigError, InversionConfig, class_members, make_config
from pipeline.engine.recipes import load_recipe, recipe_names, resolve_config


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
    config = resolve_config(config_file=path, flags={"batch_size": 2})
    assert (config.steps, config.batch_size, config.progressive_steps, config.total_vectors) == (123, 2, [50, 100], 3)


def test_config_file_errors_name_file_and_field(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: steps: Input should be a valid integer"):
        resolve_config(config_file=path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="bad.yaml: expected a mapping"):
        resolve_config(config_file=path)


def test_shipped_recipes_are_valid_configs_that_say_what_they_are_for():
    assert {"shapesworld", "sd15-object", "sd15-style", "sdxl-object", "sdxl-style"} <= set(recipe_names())
    for name in recipe_names():  # with the class word each recipe asks for (shapesworld's search needs one)
        config = make_config({**load_recipe(name), "class_word": "shape"}, source=name)
        assert config.recipe == name
    assert make_config(load_recipe("sd15-style")).templates == "style"
    assert make_config(load_recipe("sd15-object")).effective_learning_rate == pytest.approx(2e-3)


def test_recipe_then_file_then_flags(tmp_path: Path):
    path = tmp_path / "train.yaml"
    path.write_text("recipe: shapesworld\nsteps: 50\naverage_decay: 0.5\n")
    config = resolve_config(config_file=path, flags={"average_decay": 0.9, "class_word": "shape"})
    recipe = make_config({**load_recipe("shapesworld"), "class_word": "shape"})
    assert config.recipe == "shapesworld" and config.batch_size == recipe.batch_size == 8  # from the recipe
    assert config.steps == 50 and config.average_decay == 0.9  # the file over the recipe, a flag over both
    # a recipe named by a flag wins over the file's, and a path works as a name
    own = tmp_path / "mine.yaml"
    own.write_text("# my recipe\nsteps: 7\nlearning_rate: 1.0e-2\n")
    config = resolve_config(config_file=path, flags={"recipe": str(own)})
    assert (config.recipe, config.steps, config.learning_rate, config.batch_size) == (str(own), 50, 1e-2, 1)


def test_bad_recipes_name_the_recipe_and_field(tmp_path: Path):
    with pytest.raises(ConfigError, match="recipe 'nope': not a shipped recipe"):
        resolve_config(recipe="nope")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: stepz: not a training config field"):
        resolve_config(recipe=str(bad))


def test_the_class_word_gives_the_init_word_and_edit_references():
    config = make_config({"class_word": "dog", "edit_consistency": 0.5, "edit_words": ["red"]})
    assert config.init_word == "dog"
    assert config.edit_reference_words == class_members()["dog"][:REFERENCE_MEMBERS]
    assert "dog" not in config.edit_reference_words and len(config.edit_reference_words) == 4
    # explicit words win; an unlisted class falls back to the initialiser (the class word itself)
    explicit = make_config({"class_word": "dog", "init_word": "puppy", "edit_consistency": 0.5,
                            "edit_words": ["red"], "edit_reference_words": ["cow"]})  # fmt: skip
    assert (explicit.init_word, explicit.edit_reference_words) == ("puppy", ["cow"])
    unlisted = make_config({"class_word": "teapot", "edit_consistency": 0.5, "edit_words": ["red"]})
    assert (unlisted.init_word, unlisted.edit_reference_words) == ("teapot", [])
    # without edit consistency nothing is derived (reference words would be refused)
    assert make_config({"class_word": "dog"}).edit_reference_words == []
    with pytest.raises(ConfigError, match="class_word: .*single word"):
        make_config({"class_word": "big dog"})
    # every shipped class lists at least six distinct single-word members, none of them the class itself
    for word, members in class_members().items():
        assert len(set(members)) == len(members) >= 6 and word not in members and word == word.lower(), word
        assert all(len(m.split()) == 1 for m in members), word


def test_init_word_search_needs_candidates_and_records_nothing_of_them_unless_on():
    config = make_config({"class_word": "dog", "init_word_search": True})
    assert config.search_candidates() == class_members()["dog"]
    own = make_config({"init_word": "dog", "init_word_search": True,
                       "init_word_candidates": ["poodle", "dog", "poodle"]})  # fmt: skip
    assert own.search_candidates() == ["poodle"]  # never the init word itself, each once
    with pytest.raises(ConfigError, match="init_word_search needs candidates"):
        make_config({"class_word": "teapot", "init_word_search": True})
    with pytest.raises(ConfigError, match="init_word_candidates needs init_word_search"):
        make_config({"init_word_candidates": ["cat"]})
    with pytest.raises(ConfigError, match="init_word_candidates: .*'golden retriever' must be a single word"):
        make_config({"init_word_search": True, "init_word_candidates": ["golden retriever"]})
    # words proposed from the vocabulary come on top of the listed ones; they are part of the search,
    # which turns off as a whole (a recipe may propose and a flag turn the search off)
    proposing = make_config({"class_word": "dog", "init_word_search": True, "init_word_vocabulary": 8})
    assert proposing.search_candidates() == class_members()["dog"] and proposing.init_word_vocabulary == 8
    assert make_config({"class_word": "dog", "init_word_vocabulary": 8}).init_word_vocabulary == 0


def test_manifest_recipes_job_wide_and_per_concept():
    from pipeline.jobs.spec import parse_job_spec

    text = """\
job: pets
base_model: shapesworld
registry: ./reg
checkpoint_storage: ./ckpt
recipe: shapesworld
defaults: {steps: 40}
concepts:
  - {name: a, images: ./a, class_word: shape}
  - {name: b, images: ./b, init_word: painting, recipe: sd15-style, overrides: {steps: 9}}
  - {name: c, images: ./c, class_word: shape, overrides: {recipe: sd15-object}}
"""
    spec = parse_job_spec(text, "jobs.yaml")
    a, b, c = (spec.config_for(concept) for concept in spec.concepts)
    assert (a.recipe, a.steps, a.batch_size, a.init_word) == ("shapesworld", 40, 8, "shape")  # defaults over recipe
    assert a.edit_reference_words == ["circle", "square", "triangle", "ring"]  # from the class word
    assert (b.recipe, b.templates, b.steps, b.init_word) == ("sd15-style", "style", 9, "painting")
    assert (c.recipe, c.grad_accum, c.steps) == ("sd15-object", 4, 40)
    assert a.checkpoint_interval == InversionConfig().checkpoint_interval  # one default, the config's

    with pytest.raises(ConfigError, match=r"jobs.yaml:9: concepts.1.recipe: recipe 'sd15-nope': not a shipped"):
        parse_job_spec(text.replace("recipe: sd15-style", "recipe: sd15-nope"), "jobs.yaml")

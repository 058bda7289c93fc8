"""The `oneword` command end to end: real files in, real files out, errors named."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli import main
from pipeline.engine.config import InversionConfig
from pipeline.engine.formats import LearnedConcept, load_concept_file, save_concept
from pipeline.engine.init_words import CHANCE_WORDS

from .conftest import DIM

TRAIN = ["--name", "star", "--init-word", "shape", "--batch-size", "2", "--validation-steps", "2", "--quiet"]


def _train(model_dir, images, out, *extra):
    args = ["train", "--images", str(images), "--base-model", str(model_dir), "--out", str(out), *TRAIN, *extra]
    return main(args)


def test_train_writes_the_concept_logs_and_samples(tiny_model_dir, star_dir, tmp_path):
    out = tmp_path / "run"
    extra = ["--steps", "6", "--log-interval", "2", "--export", "a1111", "--num-vectors", "2",
             "--validation-prompt", "a photo of <star>", "--validation-interval", "3",
             "--known-attribute", "yellow", "--known-attribute-share", "0.3",
             "--known-attribute-pull", "0.5", "--edit-word", "green", "--edit-word", "light blue",
             "--edit-consistency", "0.2", "--edit-reference-word", "circle",
             "--edit-reference-word", "ring", "--selection-interval", "4", "--selection-samples", "2"]  # fmt: skip
    assert _train(tiny_model_dir, star_dir, out, *extra) == 0
    tensors = load_file(str(out / "learned_embeds.safetensors"))
    assert list(tensors) == ["<star>"] and tensors["<star>"].shape == (2, DIM)
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["vectors"] == 2 for r in records)
    meta = json.loads((out / "concept.json").read_text())
    assert (meta["steps"], meta["final_loss"], meta["init_word"]) == (6, records[-1]["loss"], "shape")
    known = [meta["config"][k] for k in ("known_attributes", "known_attribute_share", "known_attribute_pull")]
    assert known == [["yellow"], 0.3, 0.5]
    edit = [meta["config"][k] for k in ("edit_words", "edit_consistency", "edit_reference_words")]
    assert edit == [["green", "light blue"], 0.2, ["circle", "ring"]]
    assert meta["selected"]["step"] in (4, 6) and meta["config"]["selection_interval"] == 4  # scored at 4 and 6
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000003.png", "step-000006.png"]
    assert Image.open(out / "samples.png").size == (64, 64)  # one validation prompt -> 1x1 grid
    assert torch.equal(load_concept_file(out / "star.a1111.pt").vectors, tensors["<star>"])


@pytest.mark.heavy
def test_compile_unet_trains_the_same_run(tiny_model_dir, star_dir, tmp_path):
    runs = {"eager": [], "compiled": ["--compile-unet"]}
    for name, extra in runs.items():
        assert _train(tiny_model_dir, star_dir, tmp_path / name, "--steps", "3", "--log-interval", "1",
                      "--batch-size", "4", *extra) == 0  # fmt: skip
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "loss.jsonl").read_text().splitlines()]
              for name in runs}  # fmt: skip
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-4) and len(losses["eager"]) == 3
    configs = {name: json.loads((tmp_path / name / "concept.json").read_text())["config"] for name in runs}
    assert (configs["eager"]["compile_unet"], configs["compiled"]["compile_unet"]) == (False, True)


def test_resume_extends_a_run_to_the_same_vectors(tiny_model_dir, star_dir, tmp_path):
    assert _train(tiny_model_dir, star_dir, tmp_path / "straight", "--steps", "8") == 0
    assert _train(tiny_model_dir, star_dir, tmp_path / "split", "--steps", "4", "--checkpoint-interval", "2") == 0
    assert _train(tiny_model_dir, star_dir, tmp_path / "split", "--steps", "8", "--resume") == 0
    straight = load_file(str(tmp_path / "straight" / "learned_embeds.safetensors"))["<star>"]
    split = load_file(str(tmp_path / "split" / "learned_embeds.safetensors"))["<star>"]
    assert torch.equal(straight, split)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "loss.jsonl").read_text().splitlines()]
    assert steps == [4, 8]  # logged once each (log interval 10 -> only final steps), no duplicates


def test_a_second_run_into_the_same_folder_needs_resume(tiny_model_dir, star_dir, tmp_path, capsys):
    assert _train(tiny_model_dir, star_dir, tmp_path / "r", "--steps", "2") == 0
    before = (tmp_path / "r" / "learned_embeds.safetensors").read_bytes()
    assert _train(tiny_model_dir, star_dir, tmp_path / "r", "--steps", "2") == 2
    assert "already holds a run (checkpoint.pt); pass --resume" in capsys.readouterr().err
    assert (tmp_path / "r" / "learned_embeds.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--steps", "0"], "options: steps: Input should be greater than or equal to 1"),
        (["--flip-prob", "2"], "options: flip_prob: Input should be less than or equal to 1"),
        (["--template", "no slot"], "templates: Value error, template 'no slot' must contain '{}' exactly once"),
        (["--name", "Bad/Name"], "invalid concept name 'Bad/Name'"),
        (["--known-attribute", "<star>"], "options: known_attributes: Value error, known attribute '<star>' must"),
    ],
)
def test_bad_options_exit_2_with_the_field(tiny_model_dir, star_dir, tmp_path, capsys, extra, message):
    assert _train(tiny_model_dir, star_dir, tmp_path / "x", *extra) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing written


def test_bad_images_and_models_exit_2_naming_the_file(tiny_model_dir, star_dir, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(star_dir, images)
    (images / "broken.png").write_bytes(b"\x89PNG not really")
    assert _train(tiny_model_dir, images, tmp_path / "x", "--steps", "1") == 2
    assert "broken.png: not an image" in capsys.readouterr().err
    assert _train(tmp_path, star_dir, tmp_path / "y", "--steps", "1") == 2
    assert "not a diffusers model folder (no model_index.json)" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_generate_renders_concepts_and_refuses_foreign_ones(tiny_model_dir, tmp_path, capsys, model):
    save_concept(
        LearnedConcept("dot", torch.randn(2, model.embedding_dim), base_model=model.identity), tmp_path / "dot"
    )
    out = tmp_path / "img.png"
    args = ["generate", "a photo of <dot>", "--base-model", str(tiny_model_dir), "--concept",
            str(tmp_path / "dot" / "learned_embeds.safetensors"), "--steps", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    first = Image.open(out)
    assert first.size == (64, 64)
    assert main([*args, "--n", "4", "--width", "32", "--height", "32", "--out", str(tmp_path / "grid.png")]) == 0
    assert Image.open(tmp_path / "grid.png").size == (64, 64)  # 2x2 grid of 32 px images
    assert main(args) == 0 and Image.open(out).tobytes() == first.tobytes()  # seeded: reproducible

    save_concept(
        LearnedConcept("alien", torch.randn(1, model.embedding_dim), base_model="clip-49408x128-0000"),
        tmp_path / "alien",
    )
    foreign = ["generate", "a photo of <alien>", "--base-model", str(tiny_model_dir), "--out", str(tmp_path / "a.png"),
               "--concept", str(tmp_path / "alien" / "learned_embeds.safetensors")]  # fmt: skip
    assert main(foreign) == 2
    assert "concept 'alien' was learned on base model clip-49408x128-0000, not on this one" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(tmp_path / "b.png"), "--width", "30"]) == 2
    assert "--width 30: must be a multiple of 8" in capsys.readouterr().err
    assert main([*args[:-2], "--out", str(tmp_path / "b.png"), "--num-images", "65"]) == 2
    assert "options: n: Input should be less than or equal to 64" in capsys.readouterr().err
    assert main(["generate", "a <nobody>", "--base-model", str(tiny_model_dir), "--out", str(tmp_path / "c.png")]) == 2
    assert "prompt references <nobody>: no --concept file gives it, and no concept named 'nobody' in registry" in (
        capsys.readouterr().err
    )
    assert not any((tmp_path / n).exists() for n in ("a.png", "b.png", "c.png"))


def test_convert_between_formats(tmp_path):
    vectors = torch.randn(3, 64)
    torch.save({"emb_params": vectors}, tmp_path / "kohya.pt")
    assert main(["convert", str(tmp_path / "kohya.pt"), "--to", "a1111", "--out", str(tmp_path / "a.pt")]) == 0
    assert main(["convert", str(tmp_path / "a.pt"), "--to", "diffusers", "--out", str(tmp_path / "d.safetensors"),
                 "--name", "thing"]) == 0  # fmt: skip
    assert torch.equal(load_file(str(tmp_path / "d.safetensors"))["<thing>"], vectors)


def test_console_script_help():
    exe = Path(sys.executable).parent / "oneword"
    result = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, check=True)
    for words in ("--images", "--init-word", "--progressive-steps", "--per-image-tokens", "--resume", "--config"):
        assert words in result.stdout
    top = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert all(c in top for c in ("train", "generate", "tiny-model", "convert", "example-images"))


def test_train_from_a_recipe_records_it_and_publishes_it(tiny_model_dir, star_dir, tmp_path, capsys):
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text("# a tiny recipe\nsteps: 4\nbatch_size: 2\naverage_decay: 0.9\nedit_consistency: 0.1\n"
                      "edit_words: [green]\n")  # fmt: skip
    out, registry = tmp_path / "run", tmp_path / "registry"
    args = ["train", "--images", str(star_dir), "--base-model", str(tiny_model_dir), "--out", str(out), "--name",
            "star", "--recipe", str(recipe), "--class-word", "shape", "--steps", "3", "--validation-steps", "2",
            "--quiet", "--publish", "--registry", str(registry)]  # fmt: skip
    assert main(args) == 0
    config = json.loads((out / "concept.json").read_text())["config"]
    assert set(config) == set(InversionConfig.model_fields)  # every field, resolved
    assert (config["recipe"], config["steps"], config["average_decay"]) == (str(recipe), 3, 0.9)  # a flag won
    assert (config["init_word"], config["edit_reference_words"]) == ("shape", ["circle", "square", "triangle", "ring"])
    capsys.readouterr()
    assert main(["registry", "show", "star", "--registry", str(registry)]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == config  # the registry manifest records it too

    # with the init word search: concept.json records what it compared and the word the run trained from
    searched = tmp_path / "searched"
    search = ["--init-word-search", "--init-word-candidate", "circle", "--init-word-candidate", "star"]
    assert main([*args[:6], str(searched), "--name", "star", "--class-word", "shape", "--steps", "2", "--quiet",
                 *search]) == 0  # fmt: skip
    written = json.loads((searched / "concept.json").read_text())
    record = written["init_word_search"]
    assert set(record["losses"]) == {"shape", "circle", "star"} and record["baseline"] == "shape"
    assert len(record["random"]) == CHANCE_WORDS and record["random"] == sorted(record["random"])  # what chance scored
    assert written["config"]["init_word"] == written["init_word"] == record["chosen"]
    assert (written["config"]["init_word_search"], written["config"]["init_word_candidates"]) == (False, [])


def test_recipes_lists_and_shows_the_shipped_recipes(capsys):
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in ("shapesworld", "sd15-object", "sd15-style"))
    assert main(["recipes", "sd15-style"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith("# sd15-style") and "templates: style" in shown
    assert main(["recipes", "nope"]) == 2
    assert "recipe 'nope': not a shipped recipe" in capsys.readouterr().err

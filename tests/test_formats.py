"""Concept files: diffusers and A1111 out, diffusers/A1111/kohya/SDXL in, nothing unpickled."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from pipeline.engine.formats import (
    ConceptFileError,
    LearnedConcept,
    load_concept_file,
    save_a1111,
    save_concept,
    save_diffusers,
)

from .conftest import DIM


@pytest.fixture
def concept() -> LearnedConcept:
    vectors = torch.randn(2, DIM, generator=torch.Generator().manual_seed(0))
    return LearnedConcept("my-star", vectors, base_model="clip-test", steps=42, final_loss=0.5, config={"steps": 42})


def test_oneword_folder_round_trip(concept, tmp_path):
    save_concept(concept, tmp_path)
    loaded = load_concept_file(tmp_path / "learned_embeds.safetensors")
    assert torch.equal(loaded.vectors, concept.vectors)
    assert (loaded.name, loaded.base_model, loaded.steps, loaded.config) == ("my-star", "clip-test", 42, {"steps": 42})
    meta = json.loads((tmp_path / "concept.json").read_text())
    assert (meta["placeholder"], meta["num_vectors"], meta["dim"]) == ("<my-star>", 2, DIM)


def test_exported_file_loads_into_plain_diffusers_and_generates(concept, tiny_model_dir, tmp_path):
    path = save_diffusers(concept, tmp_path / "learned_embeds.safetensors")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<my-star>", "<my-star>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], concept.vectors)
    image = pipe("a photo of <my-star>", num_inference_steps=2, output_type="np", generator=torch.manual_seed(0)).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all() and image.std() > 0


def test_a1111_export_round_trips_and_diffusers_reads_it(concept, tiny_model_dir, tmp_path):
    path = save_a1111(concept, tmp_path / "my-star.pt")
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"string_to_token", "string_to_param", "name", "step"}
    assert torch.equal(raw["string_to_param"]["*"], concept.vectors)
    back = load_concept_file(path)
    assert (back.name, back.source, back.steps) == ("my-star", "a1111", None)
    assert torch.equal(back.vectors, concept.vectors)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(str(path), token="<a1111-star>")
    ids = pipe.tokenizer.convert_tokens_to_ids(["<a1111-star>", "<a1111-star>_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[ids], concept.vectors)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_kohya_import(tmp_path, suffix):
    vectors = torch.randn(3, 64)
    path = tmp_path / f"kohya-thing{suffix}"
    if suffix == ".safetensors":
        save_file({"emb_params": vectors}, str(path))
    else:
        torch.save({"emb_params": vectors}, path)
    loaded = load_concept_file(path)
    assert (loaded.name, loaded.source) == ("kohya-thing", "kohya")
    assert torch.equal(loaded.vectors, vectors)


def test_sdxl_pair_is_one_concept_for_both_encoders_and_not_for_an_sd_model(tmp_path):
    clip_l, clip_g = torch.randn(2, 768), torch.randn(2, 1280)
    save_file({"clip_l": clip_l, "clip_g": clip_g}, str(tmp_path / "xl.safetensors"))
    loaded = load_concept_file(tmp_path / "xl.safetensors", dim=2048)
    assert (loaded.name, loaded.source, loaded.widths, loaded.architecture) == ("xl", "sdxl", (768, 1280), "sdxl")
    assert torch.equal(loaded.vectors, torch.cat([clip_l, clip_g], dim=-1))
    for dim in (768, 1280):  # neither half stands in for a concept of an SD 1.x/2.x model
        with pytest.raises(ConceptFileError, match=rf"an SDXL embedding \(clip_l 768 \+ clip_g 1280 wide\); this "
                                                   rf"model is not SDXL \({dim}-dimensional"):  # fmt: skip
            load_concept_file(tmp_path / "xl.safetensors", dim=dim)
    # exported again, it is the same file content; a .pt name is refused with the name to use
    assert save_a1111(loaded, tmp_path / "again.safetensors") == tmp_path / "again.safetensors"
    again = load_file(str(tmp_path / "again.safetensors"))
    assert torch.equal(again["clip_l"], clip_l) and torch.equal(again["clip_g"], clip_g)
    with pytest.raises(ConceptFileError, match="is a .safetensors with clip_l and clip_g; name it x.safetensors"):
        save_a1111(loaded, tmp_path / "x.pt")
    assert not (tmp_path / "x.pt").exists()


def test_diffusers_bin_with_a_single_token(tmp_path):
    vectors = torch.randn(64)
    torch.save({"<cat-toy>": vectors}, tmp_path / "learned_embeds.bin")
    loaded = load_concept_file(tmp_path / "learned_embeds.bin")
    assert loaded.name == "cat-toy" and torch.equal(loaded.vectors, vectors[None])


class _Exploit:
    def __reduce__(self):
        return (Path.touch, (Path(_Exploit.marker),))


def test_pickled_code_is_never_executed(tmp_path):
    _Exploit.marker = str(tmp_path / "pwned")
    torch.save({"string_to_param": {"*": _Exploit()}}, tmp_path / "evil.pt")
    with pytest.raises(ConceptFileError, match="evil.pt: cannot read as a tensor-only file"):
        load_concept_file(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_bad_files_are_named(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ConceptFileError, match="junk.safetensors: not a readable safetensors file"):
        load_concept_file(tmp_path / "junk.safetensors")
    with pytest.raises(ConceptFileError, match="missing.pt: no such file"):
        load_concept_file(tmp_path / "missing.pt")
    save_file({"a": torch.zeros(2, 4), "b": torch.zeros(2, 4)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ConceptFileError, match="two.safetensors: unrecognised embedding layout"):
        load_concept_file(tmp_path / "two.safetensors")
    save_file({"<Bad Name>": torch.zeros(1, 64)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConceptFileError, match="bad.safetensors: invalid concept name 'Bad Name'"):
        load_concept_file(tmp_path / "bad.safetensors")
    assert load_concept_file(tmp_path / "bad.safetensors", name="good").name == "good"
    save_file({"<x>": torch.zeros(1, 32)}, str(tmp_path / "narrow.safetensors"))
    with pytest.raises(ConceptFileError, match="dimension 32, this model needs 64"):
        load_concept_file(tmp_path / "narrow.safetensors", dim=64)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("{not json", "its 'oneword' metadata is not valid JSON"),
        ("[" * 5000 + "]" * 5000, "its 'oneword' metadata is not valid JSON"),
        ("[1, 2]", "its 'oneword' metadata must be a JSON object, found list"),
        ('{"steps": "many"}', "metadata field 'steps' has the wrong type (str)"),
        ('{"config": [1]}', "metadata field 'config' has the wrong type (list)"),
        ('{"final_loss": true}', "metadata field 'final_loss' has the wrong type (bool)"),
    ],
)
def test_malformed_metadata_is_a_named_error_not_a_traceback(tmp_path, header, message):
    """A shared file's header may hold anything; the registry import (CLI) says what is wrong."""
    import subprocess
    import sys

    path = tmp_path / "shared.safetensors"
    save_file({"<shared>": torch.zeros(1, 32)}, str(path), metadata={"oneword": header})
    with pytest.raises(ConceptFileError, match=re.escape(f"shared.safetensors: {message}")):
        load_concept_file(path)
    if header == "{not json":  # and through the CLI: exit 2, one line, nothing published
        registry = tmp_path / "registry"
        command = [sys.executable, "-m", "pipeline.cli", "registry", "import", str(path), "--name", "shared",
                   "--registry", str(registry)]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr
        assert not any(registry.rglob("*.json"))


def test_a_failed_write_leaves_no_partial_file(concept, tmp_path, monkeypatch):
    """Unit test of an error path a real disk will not produce on demand (the write failing)."""
    import pipeline.engine.formats as formats

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(formats, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_diffusers(concept, tmp_path / "learned_embeds.safetensors")
    assert list(tmp_path.iterdir()) == []

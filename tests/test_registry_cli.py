"""`oneword registry`, `train --publish`, `generate` from the registry and base models in S3:
through the real CLI, against a folder and a real S3 server."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from pipeline.cli import main
from pipeline.engine.formats import LearnedConcept, load_concept_file
from pipeline.engine.model import load_base_model
from pipeline.store.model_cache import fetch_model, local_model_source
from pipeline.store.registry import Registry
from pipeline.store.storage import S3Storage

from .conftest import DIM

TRAIN = ["--name", "star", "--init-word", "shape", "--batch-size", "2", "--steps", "3", "--quiet",
         "--validation-steps", "2"]  # fmt: skip


def test_train_publish_show_export_generate(tiny_model_dir, star_dir, tmp_path, storage_location, capsys):
    out = tmp_path / "run"
    args = ["train", "--images", str(star_dir), "--base-model", str(tiny_model_dir), "--out", str(out), *TRAIN]
    assert main([*args, "--publish", "--registry", storage_location]) == 0
    published = capsys.readouterr().out.strip().splitlines()[-1]
    assert published.startswith("published <star@") and storage_location in published

    assert main(["registry", "ls", "--registry", storage_location, "--json"]) == 0
    [listed] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (listed["name"], listed["num_vectors"], listed["dim"]) == ("star", 1, DIM)
    assert main(["registry", "show", "star", "--registry", storage_location]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == listed and shown["config"]["steps"] == 3 and shown["metrics"]["final_loss"] > 0

    # the preview is the first image of the run's samples, small, kept with the version
    preview = tmp_path / "preview.png"
    assert main(["registry", "preview", "star", "--out", str(preview), "--registry", storage_location]) == 0
    assert preview.read_bytes() == (out / "preview.png").read_bytes()
    assert shown["preview_size"] == len(preview.read_bytes())

    trained = load_concept_file(out / "learned_embeds.safetensors")
    export = tmp_path / "star.pt"
    assert main(["registry", "export", f"star@{shown['version']}", "--format", "a1111", "--out", str(export),
                 "--registry", storage_location]) == 0  # fmt: skip
    assert torch.equal(load_concept_file(export).vectors, trained.vectors)

    common = ["--base-model", str(tiny_model_dir), "--steps", "2", "--num-images", "2", "--device", "cpu"]
    from_file, from_registry = tmp_path / "file.png", tmp_path / "registry.png"
    prompt = "a photo of <star>"
    assert main(["generate", prompt, *common, "--concept", str(out / "learned_embeds.safetensors"),
                 "--out", str(from_file)]) == 0  # fmt: skip
    assert main(["generate", prompt, *common, "--registry", storage_location, "--out", str(from_registry)]) == 0
    pinned = tmp_path / "pinned.png"
    assert main(["generate", f"a photo of <star@{shown['version']}>", *common, "--registry", storage_location,
                 "--out", str(pinned)]) == 0  # fmt: skip
    assert from_file.read_bytes() == from_registry.read_bytes() == pinned.read_bytes()


def test_import_rm_and_their_errors(tiny_model_dir, tmp_path, storage_location, capsys):
    source = tmp_path / "cat.pt"
    from pipeline.engine.formats import save_a1111

    save_a1111(LearnedConcept("cat", torch.arange(2 * DIM, dtype=torch.float32).view(2, DIM)), source)
    assert main(["registry", "import", str(source), "--name", "my-cat", "--registry", storage_location]) == 0
    ref = capsys.readouterr().out.split("<")[1].split(">")[0]
    manifest, concept = Registry.open(storage_location).get("my-cat")
    assert ref == manifest.ref and torch.equal(concept.vectors, torch.arange(2 * DIM, dtype=torch.float32).view(2, DIM))

    # an imported concept has no preview until one is rendered, on the model it fits
    stored = ["--out", str(tmp_path / "p.png"), "--registry", storage_location]
    assert main(["registry", "preview", "my-cat", *stored]) == 2
    assert f"<{ref}> has no preview image" in capsys.readouterr().err
    assert main(["registry", "preview", "my-cat", "--base-model", str(tiny_model_dir), "--steps", "2",
                 "--registry", storage_location]) == 0  # fmt: skip
    assert "kept a preview" in capsys.readouterr().out
    with_preview, png = Registry.open(storage_location).preview("my-cat")
    side = load_base_model(tiny_model_dir, "cpu").resolution  # rendered at the model's size (under 256)
    assert with_preview.version == manifest.version and Image.open(io.BytesIO(png)).size == (side, side)

    assert main(["registry", "rm", "my-cat", "--registry", storage_location]) == 2
    assert "rm needs an explicit version" in capsys.readouterr().err
    assert main(["registry", "rm", ref, "--registry", storage_location]) == 0
    assert main(["registry", "show", "my-cat", "--registry", storage_location]) == 2
    assert "no concept named 'my-cat'" in capsys.readouterr().err
    assert main(["registry", "import", str(source), "--name", "../evil", "--registry", storage_location]) == 2
    assert "1-64 characters from lowercase letters" in capsys.readouterr().err


def test_concept_from_another_base_model_is_refused(tiny_model_dir, tmp_path, storage_location, capsys):
    registry = Registry.open(storage_location)
    registry.publish(LearnedConcept("alien", torch.zeros(1, DIM), base_model="clip-text:0123456789abcdef"))
    registry.publish(LearnedConcept("wide", torch.zeros(1, 768)))
    for name, message in (("alien", "was learned on base model clip-text:0123456789abcdef"),
                          ("wide", "768-dimensional vectors")):  # fmt: skip
        code = main(["generate", f"a photo of <{name}>", "--base-model", str(tiny_model_dir), "--steps", "1",
                     "--registry", storage_location, "--out", str(tmp_path / "x.png")])  # fmt: skip
        assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_cli_storage_errors_never_show_credentials(s3_env, s3_bucket, monkeypatch, capsys):
    monkeypatch.setenv("ONEWORD_S3_SECRET_KEY", "not-the-secret-42")
    assert main(["registry", "ls", "--registry", f"s3://{s3_bucket}/reg"]) == 1
    err = capsys.readouterr().err
    assert "refused the credentials" in err and "not-the-secret-42" not in err
    assert s3_env["ONEWORD_S3_SECRET_KEY"] not in err and s3_env["ONEWORD_S3_ACCESS_KEY"] not in err


# --- base models in object storage ----------------------------------------------------------------


def _upload_folder(folder, storage) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            storage.put(path.relative_to(folder).as_posix(), path.read_bytes())


def _fetch(location: str, cache: str, env: dict[str, str], queue) -> None:
    os.environ.update(env)
    path, downloaded = fetch_model(location, cache=Path(cache))
    queue.put((str(path), downloaded))


def test_base_model_from_s3_is_downloaded_once(tiny_model_dir, s3_env, s3_settings, s3_bucket, tmp_path, monkeypatch):
    _upload_folder(tiny_model_dir, S3Storage(s3_bucket, "models/tiny", s3_settings))
    location = f"s3://{s3_bucket}/models/tiny/"
    cache = tmp_path / "cache"

    spawn = multiprocessing.get_context("spawn")
    queue = spawn.Queue()
    env = {k: v for k, v in os.environ.items() if k.startswith("ONEWORD_S3_")}
    workers = [spawn.Process(target=_fetch, args=(location, str(cache), env, queue)) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    results = [queue.get(timeout=5) for _ in workers]
    assert len({path for path, _ in results}) == 1  # both see the same folder
    assert sorted(downloaded for _, downloaded in results) == [False, True]  # one download, one wait

    monkeypatch.setenv("ONEWORD_CACHE", str(tmp_path / "cache2"))
    from_s3 = load_base_model(local_model_source(location), "cpu")
    local = load_base_model(tiny_model_dir, "cpu")
    assert from_s3.identity == local.identity
    assert fetch_model(location)[1] is False  # the second use reads the cache
    for a, b in zip(from_s3.unet.state_dict().values(), local.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_base_model_location_without_a_model(s3_env, s3_bucket, tmp_path):
    from pipeline.errors import InputError

    with pytest.raises(InputError, match="not a diffusers model folder"):
        fetch_model(f"s3://{s3_bucket}/nothing-here", cache=tmp_path)

"""SDXL-shaped models: two text encoders, a concept's rows side by side, the UNet's pooled and size
conditioning; checked against diffusers' own StableDiffusionXLPipeline on the tiny SDXL model."""

from __future__ import annotations

import base64
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from pipeline.cli.main import main
from pipeline.engine.config import InversionConfig
from pipeline.engine.formats import (
    DIFFUSERS_FILENAME,
    ConceptFileError,
    LearnedConcept,
    a1111_file_name,
    load_concept_file,
    save_a1111,
    save_concept,
)
from pipeline.engine.generation import ImageGenerator, IncompatibleConceptError, check_compatible
from pipeline.engine.init_words import CHANCE_WORDS, COLOUR_WORDS, chance_rows, vocabulary
from pipeline.engine.inversion import Inversion
from pipeline.engine.model import TINY_TEXT_CONFIG, TINY_TEXT_CONFIG_2, load_base_model
from pipeline.store.registry import Registry

from .test_bulk_jobs import DEFAULTS, oneword, reference_vectors, write_manifest
from .test_packing import mixed_requests, run_pack, solo
from .test_serving import running_service

WIDTHS = (TINY_TEXT_CONFIG["hidden_size"], TINY_TEXT_CONFIG_2["hidden_size"])


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny-sdxl")
    assert main(["tiny-model", str(out), "--arch", "sdxl"]) == 0  # as users build it
    return out


@pytest.fixture(scope="module")
def sdxl(sdxl_dir):
    return load_base_model(sdxl_dir, "cpu")


@pytest.fixture(scope="module")
def plain_pipe(sdxl_dir) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_architecture_comes_from_the_model(sdxl, model):
    assert (sdxl.architecture, model.architecture) == ("sdxl", "sd")
    assert sdxl.embedding_dims == WIDTHS and sdxl.embedding_dim == sum(WIDTHS)
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer_2.pad_token_id == 0  # as SDXL's second
    assert sdxl.identity.count("+") == 1 and sdxl.identity.split("+")[0] != sdxl.identity.split("+")[1]
    assert sdxl.token_embedding("shape").shape == (sum(WIDTHS),)
    assert sdxl.resolution == 64


def test_plain_prompts_condition_the_unet_as_diffusers_does(sdxl, plain_pipe):
    """Penultimate states of both encoders side by side, and the second's pooled projection."""
    prompts = ["a photo of a star", "a red square on a blue background"]
    hidden, _, pooled, _ = plain_pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    ours = sdxl.prompt_encoder().condition(prompts, {})
    assert ours.hidden.shape == (2, 77, sum(WIDTHS)) and ours.pooled.shape == (2, TINY_TEXT_CONFIG_2["projection_dim"])
    torch.testing.assert_close(ours.hidden, hidden, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.pooled, pooled, rtol=0, atol=1e-5)


def test_the_exported_file_generates_in_plain_diffusers_what_oneword_generates(sdxl, sdxl_dir, tmp_path):
    """The A1111/Forge/ComfyUI file (clip_l, clip_g), loaded into a plain pipeline with one
    ``load_textual_inversion`` call per encoder, gives the images oneword gives with the concept."""
    vectors = torch.randn(2, sum(WIDTHS), generator=torch.Generator().manual_seed(1)) * 0.02
    concept = LearnedConcept("blob", vectors, base_model=sdxl.identity, widths=sdxl.concept_widths)
    path = save_a1111(concept, tmp_path / a1111_file_name(concept))
    assert path.name == "blob.a1111.safetensors"
    pair = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in pair.items()} == {"clip_l": (2, WIDTHS[0]), "clip_g": (2, WIDTHS[1])}

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(pair["clip_l"], token="<blob>", text_encoder=pipe.text_encoder,
                                tokenizer=pipe.tokenizer)  # fmt: skip
    pipe.load_textual_inversion(pair["clip_g"], token="<blob>", text_encoder=pipe.text_encoder_2,
                                tokenizer=pipe.tokenizer_2)  # fmt: skip
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # what oneword generates with
    prompt = "a watercolour of <blob> on a boat"
    theirs = pipe(prompt, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                  output_type="np").images[0]  # fmt: skip
    imported = load_concept_file(path, dim=sdxl.embedding_dim)
    generator = ImageGenerator(sdxl)
    ours = generator.generate([prompt], {"blob": imported.vectors}, seeds=[7], steps=4, guidance_scale=5.0)[0]
    ours = np.asarray(ours, dtype=np.float32) / 255
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert np.abs(ours - theirs).max() <= 1 / 255 + 1e-6  # the same image, up to 8-bit rounding
    other = generator.generate([prompt], {"blob": -vectors}, seeds=[7], steps=4, guidance_scale=5.0)[0]
    assert np.abs(np.asarray(other, dtype=np.float32) / 255 - ours).max() > 0.02  # the concept matters

    # oneword's own output is what diffusers' SDXL example writes: one file per encoder
    own = save_concept(concept, tmp_path / "run")
    assert sorted(p.name for p in own.parent.glob("*.safetensors")) == [DIFFUSERS_FILENAME,
                                                                        "learned_embeds_2.safetensors"]  # fmt: skip
    back = load_concept_file(own, dim=sdxl.embedding_dim)
    assert (back.name, back.widths) == ("blob", WIDTHS) and torch.equal(back.vectors, vectors)
    fresh = StableDiffusionXLPipeline.from_pretrained(sdxl_dir, add_watermarker=False)
    fresh.set_progress_bar_config(disable=True)
    fresh.load_textual_inversion(own, token="<blob>", text_encoder=fresh.text_encoder, tokenizer=fresh.tokenizer)
    fresh.load_textual_inversion(own.parent / "learned_embeds_2.safetensors", token="<blob>",
                                 text_encoder=fresh.text_encoder_2, tokenizer=fresh.tokenizer_2)  # fmt: skip
    fresh.scheduler = DDIMScheduler.from_config(fresh.scheduler.config)
    again = fresh(prompt, num_inference_steps=4, guidance_scale=5.0, generator=torch.Generator().manual_seed(7),
                  output_type="np").images[0]  # fmt: skip
    assert np.array_equal(again, theirs)
    (own.parent / "learned_embeds_2.safetensors").unlink()
    with pytest.raises(ConceptFileError, match="second encoder's rows belong in learned_embeds_2.safetensors"):
        load_concept_file(own)


def test_the_registry_keeps_the_architecture_and_refuses_a_pair_for_an_sd_model(sdxl, tiny_model_dir, tmp_path,
                                                                                capsys):  # fmt: skip
    registry = Registry.open(str(tmp_path / "registry"))
    vectors = torch.randn(1, sum(WIDTHS), generator=torch.Generator().manual_seed(2))
    manifest = registry.publish(LearnedConcept("xl", vectors, base_model=sdxl.identity, widths=sdxl.concept_widths))
    assert (manifest.architecture, manifest.widths) == ("sdxl", list(WIDTHS))
    _, back = registry.get("xl")
    assert back.widths == WIDTHS and torch.equal(back.vectors, vectors)
    assert main(["registry", "show", "xl", "--registry", registry.location]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert (shown["architecture"], shown["widths"]) == ("sdxl", list(WIDTHS))

    pair = save_a1111(back, tmp_path / "xl.safetensors")
    code = main(["registry", "import", str(pair), "--name", "wrong", "--base-model", str(tiny_model_dir),
                 "--registry", registry.location])  # fmt: skip
    assert code != 0 and "an SDXL embedding (clip_l 128 + clip_g 192 wide); this model is not SDXL" in (
        capsys.readouterr().err
    )
    assert registry.versions("wrong") == []  # nothing stored


def test_inversion_trains_both_encoders_rows_and_resumes_exactly(sdxl, star_images):
    config = InversionConfig(steps=4, batch_size=2, learning_rate=5e-3, init_word="shape", seed=0)
    engine = Inversion(sdxl, star_images, config, "star")
    start = engine.learned_vectors().clone()
    for _ in range(2):
        engine.step()
    state = engine.state_dict()
    for _ in range(2):
        engine.step()
    learned = engine.learned_vectors()
    assert learned.shape == (1, sum(WIDTHS)) and np.isfinite(engine.last_loss)
    moved = (learned - start).abs()
    assert moved[:, : WIDTHS[0]].max() > 0 and moved[:, WIDTHS[0] :].max() > 0  # both encoders' rows learn
    resumed = Inversion(sdxl, star_images, config, "star")
    resumed.load_state_dict(state)
    for _ in range(2):
        resumed.step()
    assert torch.equal(resumed.learned_vectors(), learned)


def test_the_init_word_searchs_random_words_cover_both_encoders(sdxl, model):
    """The search's chance baseline: random words with each encoder's own width and median norm;
    for one encoder the same draws as before SDXL existed (recorded runs stay reproducible)."""
    rows = chance_rows(sdxl.text_encoders, seed=3)
    assert rows.shape == (CHANCE_WORDS, 1, sum(WIDTHS))
    for encoder, part in zip(sdxl.text_encoders, rows.split(list(WIDTHS), dim=-1), strict=True):
        median = encoder.get_input_embeddings().weight.float().norm(dim=-1).median()
        assert torch.allclose(part.norm(dim=-1), median.expand(CHANCE_WORDS, 1))
    one = chance_rows(model.text_encoders, seed=3)
    directions = torch.randn(CHANCE_WORDS, 1, one.shape[-1], generator=torch.Generator().manual_seed(3))
    median = model.text_encoder.get_input_embeddings().weight.float().norm(dim=-1).median()
    assert torch.equal(one, directions / directions.norm(dim=-1, keepdim=True) * median)


def test_the_vocabulary_proposals_choose_from_is_whole_words_in_both_encoders(sdxl, model):
    """The words the init word search may propose: whole lower-case words of one token, no colour
    words, with each encoder's embedding side by side exactly as a prompt would use them."""
    for base, width in ((model, WIDTHS[0]), (sdxl, sum(WIDTHS))):
        words, rows = vocabulary(base)
        assert len(words) == len(rows) > 10_000 and rows.shape[-1] == width
        assert {"dog", "long", "shape"} <= set(words) and not COLOUR_WORDS & set(words)
        assert all(w.isalpha() and w.islower() and len(w) >= 3 for w in words)
        for i in (0, len(words) // 2, len(words) - 1, words.index("dog")):
            assert torch.equal(rows[i : i + 1], base.text_embeddings(words[i])), words[i]


def test_concepts_of_the_other_architecture_are_refused_naming_both(sdxl, model):
    sd_concept = LearnedConcept("old", torch.zeros(1, WIDTHS[0]), base_model=model.identity)
    xl_concept = LearnedConcept("new", torch.zeros(1, sum(WIDTHS)), base_model=sdxl.identity)
    check_compatible(xl_concept, sdxl)
    with pytest.raises(IncompatibleConceptError, match=r"'old' was learned on an SD 1.x/2.x model; this base model is "
                                                       r"SDXL \(128 \+ 192-dimensional"):  # fmt: skip
        check_compatible(sd_concept, sdxl)
    with pytest.raises(IncompatibleConceptError, match="'new' was learned on an SDXL model; this base model is SD 1.x"):
        check_compatible(xl_concept, model)


def test_an_sdxl_bulk_job_trains_and_publishes_like_an_sd_one(ray_head, s3_bucket, sdxl_dir, star_dir, tmp_path):
    """On the real Ray head, checkpoints and registry in the real S3 server: the same manifest
    with an SDXL base model publishes a concept for both encoders, equal to the engine run here."""
    concepts = [{"name": "xl-star", "images": str(star_dir), "init_word": "shape"}]
    manifest = write_manifest(tmp_path / "jobs.yaml", "xl-job", s3_bucket, sdxl_dir, concepts,
                              defaults={**DEFAULTS, "steps": 10}, checkpoint_interval=5)  # fmt: skip
    result = oneword("submit", str(manifest), "--address", ray_head.jobs_api, "--watch", env=ray_head.env)
    assert result.returncode == 0, result.stderr
    os.environ.update({k: v for k, v in ray_head.env.items() if k.startswith("ONEWORD_S3_")})
    entry, learned = Registry.open(f"s3://{s3_bucket}/registry").get("xl-star")
    assert (entry.architecture, entry.job_id, learned.widths) == ("sdxl", "xl-job", WIDTHS)
    assert torch.equal(learned.vectors, reference_vectors(sdxl_dir, star_dir, 10))


def test_the_service_serves_an_sdxl_model_and_refuses_sd_concepts(ray_head, sdxl, sdxl_dir, model, tmp_path):
    registry = Registry.open(str(tmp_path / "registry"))
    vectors = {name: torch.randn(1, sum(WIDTHS), generator=torch.Generator().manual_seed(i)) * 0.02
               for i, name in enumerate(("red-xl", "blue-xl"))}  # fmt: skip
    for name, rows in vectors.items():
        registry.publish(LearnedConcept(name, rows, base_model=sdxl.identity, widths=sdxl.concept_widths))
    registry.publish(LearnedConcept("old-sd", torch.zeros(1, WIDTHS[0]), base_model=model.identity))
    settings = {"default_steps": 2, "min_size": 16, "max_size": 64, "num_cpus": 0.5, "concept_ttl_s": 1}
    with running_service(ray_head, sdxl_dir, registry.location, settings, tmp_path, replicas=1) as base:
        bodies = [{"prompt": f"a photo of <{name}>", "seed": 3, "width": 32, "height": 32} for name in vectors]
        with ThreadPoolExecutor(2) as pool:  # at once: one batch, two concepts
            answers = list(pool.map(lambda body: httpx.post(f"{base}/v1/generate", json=body, timeout=120), bodies))
        openai = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a <red-xl>", "size": "32x32"},
                            timeout=120)  # fmt: skip
        refused = httpx.post(f"{base}/v1/generate", json={"prompt": "a photo of <old-sd>"}, timeout=120)
    assert [a.status_code for a in answers] == [200, 200] and openai.status_code == 200, openai.text
    generator = ImageGenerator(sdxl)
    for (name, rows), answer in zip(vectors.items(), answers, strict=True):
        served = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer.json()["images"][0]))).convert("RGB"))
        alone = np.asarray(generator.generate([f"a photo of <{name}>"], {name: rows}, seeds=[3], steps=2,
                                              height=32, width=32)[0])  # fmt: skip
        assert served.shape == (32, 32, 3) and np.abs(served.astype(int) - alone.astype(int)).max() <= 1
    assert refused.status_code == 409 and refused.json()["code"] == "incompatible_concept"
    assert "learned on an SD 1.x/2.x model; this base model is SDXL" in refused.json()["message"]


def test_packed_sdxl_concepts_learn_what_they_learn_alone(sdxl, star_images):
    """Packs share the text encoders' and the UNet's calls (with SDXL's pooled and size conditioning)."""
    requests = mixed_requests(dict.fromkeys(("star", "cross", "ring", "arrow"), star_images), steps=4)
    packed, failures = run_pack(sdxl, requests, size=4)
    assert not failures and set(packed) == {r.name for r in requests}
    for request in requests:
        torch.testing.assert_close(packed[request.name], solo(sdxl, request), rtol=0, atol=1e-5)

import pytest
import torch
from diffusers import StableDiffusionPipeline

from pipeline.engine.concepts import (
    ConceptRef,
    InvalidNameError,
    PromptTooLongError,
    UnknownConceptError,
    concept_refs,
    parse_prompt,
    validate_name,
)
from pipeline.engine.prompt_encoder import PromptEncoder

from .conftest import DIM


def test_parse_prompt_splits_text_and_references():
    parts = parse_prompt("a <my-dog> next to <cat_2@v3> and <Not-A-Ref>")
    assert parts == ["a ", ConceptRef("my-dog", None), " next to ", ConceptRef("cat_2", "v3"), " and <Not-A-Ref>"]
    assert [r.key for r in concept_refs("<a> <b@1> <a>")] == ["a", "b@1"]


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "with space", "Upper", "dоg", "x" * 65, "a.b"])
def test_invalid_names_are_refused_with_the_rule(bad):
    with pytest.raises(InvalidNameError, match="1-64 characters from lowercase letters"):
        validate_name(bad)


@pytest.mark.parametrize("good", ["a", "my-dog", "cat_2", "x" * 64, "0"])
def test_valid_names(good):
    assert validate_name(good) == good


def test_plain_prompts_encode_like_the_text_encoder(model):
    ids = model.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    expected = model.text_encoder(ids).last_hidden_state
    assert torch.equal(PromptEncoder(model.tokenizer, model.text_encoder).encode(["a photo of a cat"], {}), expected)


def test_vectors_in_the_prompt_match_diffusers_load_textual_inversion(tiny_model_dir, model, tmp_path):
    """Our per-batch placement gives the same hidden states as diffusers' tokenizer surgery."""
    vectors = torch.randn(3, model.embedding_dim, generator=torch.Generator().manual_seed(0))
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.load_textual_inversion(vectors, token="<my-dog>", tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    prompt = "a watercolour of <my-dog> on a boat"
    expected, _ = pipe.encode_prompt(prompt, "cpu", 1, False)

    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    ours = encoder.encode([prompt], {"my-dog": vectors})
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert len(model.tokenizer) == 49408  # our tokenizer was never touched


def test_one_batch_mixes_concepts_without_interference(model):
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    g = torch.Generator().manual_seed(1)
    table = {"dog": torch.randn(1, DIM, generator=g), "style@v2": torch.randn(2, DIM, generator=g)}
    prompts = ["a photo of <dog>", "a painting in the style of <style@v2>", "<dog> in the style of <style@v2>"]
    together = encoder.encode(prompts, table)
    for i, prompt in enumerate(prompts):
        assert torch.equal(together[i], encoder.encode([prompt], table)[0])
    assert not torch.equal(together[0], encoder.encode(["a photo of <dog>"], {"dog": table["dog"] + 1})[0])


def test_gradients_reach_only_the_vectors(model):
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    vectors = torch.zeros(2, DIM, requires_grad=True)
    encoder.encode(["a <x> here"], {"x": vectors}).sum().backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.text_encoder.parameters())


def test_unknown_concept_and_too_long_prompts(model):
    encoder = PromptEncoder(model.tokenizer, model.text_encoder)
    with pytest.raises(UnknownConceptError, match=r"<cat> but no vectors were given for it; known: dog"):
        encoder.encode(["a <cat>"], {"dog": torch.zeros(1, DIM)})
    long_prompt = "a photo of " + "<dog> " * 20
    with pytest.raises(PromptTooLongError, match="needs 85 tokens after concept expansion, the limit is 77"):
        encoder.encode([long_prompt], {"dog": torch.zeros(4, DIM)})

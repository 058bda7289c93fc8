"""Image generation with concepts in the prompt, through a stock diffusers pipeline.

Prompts are encoded by ``PromptEncoder`` (concept vectors placed per batch), then handed to
``StableDiffusionPipeline`` (or ``StableDiffusionXLPipeline``, with the pooled embeddings too) as
``prompt_embeds``: the tokenizer and embedding matrix stay
untouched, so prompts with different concepts can share one batch. Each image has its own seeded
generator, so an image does not depend on what else was in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from pipeline.engine.formats import LearnedConcept
from pipeline.engine.model import BaseModel, widths_of
from pipeline.errors import InputError


class IncompatibleConceptError(InputError):
    """A concept learned on a different base model (identity or dimension mismatch)."""


def architecture_of(identity: str) -> str:
    """The architecture a base-model identity belongs to, by name (SDXL's has two text encoders)."""
    return "SDXL" if widths_of(identity) else "SD 1.x/2.x"


def check_compatible(concept: LearnedConcept, model: BaseModel) -> None:
    """Refuses vectors from another embedding space instead of producing garbage images."""
    ours = architecture_of(model.identity)
    if concept.base_model is not None and architecture_of(concept.base_model) != ours:
        raise IncompatibleConceptError(
            f"concept {concept.name!r} was learned on an {architecture_of(concept.base_model)} model; "
            f"this base model is {ours} ({' + '.join(map(str, model.embedding_dims))}-dimensional text input)"
        )
    if concept.dim != model.embedding_dim:
        raise IncompatibleConceptError(
            f"concept {concept.name!r} has {concept.dim}-dimensional vectors; "
            f"this base model's text encoders use {' + '.join(map(str, model.embedding_dims))}"
        )
    if concept.base_model is not None and concept.base_model != model.identity:
        raise IncompatibleConceptError(
            f"concept {concept.name!r} was learned on base model {concept.base_model}, "
            f"not on this one ({model.identity})"
        )


class ImageGenerator:
    """Text-to-image with concept vectors; one per process (the diffusers scheduler is stateful)."""

    def __init__(self, model: BaseModel):
        self.model = model
        self.encoder = model.prompt_encoder()
        scheduler = DDIMScheduler.from_config(model.scheduler_config)
        if model.architecture == "sdxl":
            self.pipe = StableDiffusionXLPipeline(
                vae=model.vae, text_encoder=model.text_encoder, text_encoder_2=model.text_encoder_2,
                tokenizer=model.tokenizer, tokenizer_2=model.tokenizer_2, unet=model.unet, scheduler=scheduler,
                force_zeros_for_empty_prompt=model.force_zeros_for_empty_prompt, add_watermarker=False,
            )  # fmt: skip
        else:
            self.pipe = StableDiffusionPipeline(
                vae=model.vae,
                text_encoder=model.text_encoder,
                tokenizer=model.tokenizer,
                unet=model.unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        concepts: Mapping[str, torch.Tensor],
        *,
        negative_prompts: Sequence[str] | None = None,
        seeds: Sequence[int] | None = None,
        steps: int = 25,
        guidance_scale: float = 7.5,
        height: int | None = None,
        width: int | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[Image.Image]:
        """One image per prompt; ``seeds[i]`` makes image i reproducible on its own.

        ``should_stop`` is asked after every denoising step; once it says yes the remaining steps
        are skipped (diffusers' interrupt), so abandoned work frees the device within one step.
        """
        model = self.model
        seeds = list(seeds) if seeds is not None else list(range(len(prompts)))
        negative_prompts = list(negative_prompts) if negative_prompts is not None else [""] * len(prompts)
        vectors = {key: v.to(model.device, model.dtype) for key, v in concepts.items()}
        positive = self.encoder.condition(prompts, vectors)
        negative = self.encoder.condition(negative_prompts, vectors)
        embeds = {"prompt_embeds": positive.hidden, "negative_prompt_embeds": negative.hidden}
        if positive.pooled is not None:  # SDXL
            if model.force_zeros_for_empty_prompt:  # as diffusers does: no negative prompt means zeros
                empty = torch.tensor([not p for p in negative_prompts], device=model.device)[:, None]
                negative.hidden = negative.hidden.masked_fill(empty[:, :, None], 0)
                negative.pooled = negative.pooled.masked_fill(empty, 0)
                embeds["negative_prompt_embeds"] = negative.hidden
            embeds |= {"pooled_prompt_embeds": positive.pooled, "negative_pooled_prompt_embeds": negative.pooled}
        generators = [torch.Generator(model.device).manual_seed(s) for s in seeds]
        size = model.resolution

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            pipe._interrupt = should_stop is not None and should_stop()  # read by the denoising loop
            return tensors

        return self.pipe(
            **embeds,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height or size,
            width=width or size,
            output_type="pil",
            callback_on_step_end=step_end,
        ).images


def image_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tiles images row by row into one picture."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid

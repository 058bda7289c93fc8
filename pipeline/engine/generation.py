"""Image generation with concepts in the prompt, through a stock diffusers pipeline.

Prompts are encoded by ``PromptEncoder`` (concept vectors placed per batch), then handed to
``StableDiffusionPipeline`` as ``prompt_embeds``: the tokenizer and embedding matrix stay
untouched, so prompts with different concepts can share one batch. Each image has its own seeded
generator, so an image does not depend on what else was in its batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from pipeline.engine.formats import LearnedConcept
from pipeline.engine.model import BaseModel
from pipeline.engine.prompt_encoder import PromptEncoder
from pipeline.errors import InputError


class IncompatibleConceptError(InputError):
    """A concept learned on a different base model (identity or dimension mismatch)."""


def check_compatible(concept: LearnedConcept, model: BaseModel) -> None:
    """Refuses vectors from another embedding space instead of producing garbage images."""
    if concept.dim != model.embedding_dim:
        raise IncompatibleConceptError(
            f"concept {concept.name!r} has {concept.dim}-dimensional vectors; "
            f"this base model's text encoder uses {model.embedding_dim}"
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
        self.encoder = PromptEncoder(model.tokenizer, model.text_encoder)
        self.pipe = StableDiffusionPipeline(
            vae=model.vae,
            text_encoder=model.text_encoder,
            tokenizer=model.tokenizer,
            unet=model.unet,
            scheduler=DDIMScheduler.from_config(model.scheduler_config),
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
        prompt_embeds = self.encoder.encode(prompts, vectors)
        negative_embeds = self.encoder.encode(negative_prompts, vectors)
        generators = [torch.Generator(model.device).manual_seed(s) for s in seeds]
        size = model.resolution

        def step_end(pipe, step: int, timestep, tensors: dict) -> dict:
            pipe._interrupt = should_stop is not None and should_stop()  # read by the denoising loop
            return tensors

        return self.pipe(
            prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_embeds,
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

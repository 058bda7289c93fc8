"""The options of one generation request, light to import (pydantic only): the HTTP service's
request model and the ``oneword generate`` flags are generated from it, so both speak one
vocabulary."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class GenerationOptions(BaseModel):
    """What a generation asks for, in one vocabulary: the HTTP API's request body
    (``POST /v1/generate``) and the options of ``oneword generate`` are both this model."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=2000, examples=["a photo of a <my-star> on a beach"],
                        description="the prompt; <name> or <name@version> places a concept")  # fmt: skip
    negative_prompt: str = Field("", max_length=2000, description="what the images should not show")
    n: int = Field(1, ge=1, le=64, description="number of images (the service's max_images applies)")
    steps: int | None = Field(None, ge=1, le=1000, description="denoising steps (default: 25, or the service's)")
    guidance_scale: float = Field(7.5, ge=0, le=50, description="classifier-free guidance scale")
    width: int | None = Field(None, ge=8, le=4096, description="image width, a multiple of 8 (default: the model's)")
    height: int | None = Field(None, ge=8, le=4096, description="image height, a multiple of 8 (default: the model's)")
    seed: int | None = Field(None, ge=0, le=2**31 - 1,
                             description="image i uses seed + i (default: random; 0 for oneword generate)")  # fmt: skip

    @field_validator("prompt")
    @classmethod
    def _not_blank(cls, prompt: str) -> str:
        if not prompt.strip():
            raise ValueError("the prompt is empty (only whitespace)")
        return prompt

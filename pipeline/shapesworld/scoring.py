"""Scoring a learned concept in ShapesWorld: the paper's two axes, read off by the oracle.

- reconstruction: "a photo of a S*" shows the concept's shape in its training colour;
- editability: "a photo of a <colour> S*" shows the concept's shape in the *requested* colour
  (and, separately, how often an edited prompt still shows the right shape).

The subject can be a learned concept (``<name>``) or a plain word ("star" for the upper bound,
the initialiser word for the lower bound), so all three are scored by the same prompts, seeds and
sampler.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from pipeline.engine.generation import ImageGenerator, image_grid
from pipeline.engine.model import resolve_model_source
from pipeline.shapesworld.oracle import Oracle, load_oracle, to_tensor
from pipeline.shapesworld.world import COLOURS

GUIDANCE = 5.0
SAMPLING_STEPS = 25


def bundled_dir() -> Path:
    """The ShapesWorld model (``model/``) and oracle shipped inside the package."""
    return Path(resolve_model_source("shapesworld")).parent


@lru_cache(maxsize=1)
def bundled_oracle() -> Oracle:
    return load_oracle(bundled_dir() / "oracle.safetensors")


def edit_colours(training_colour: str, count: int = 3) -> list[str]:
    """A fixed choice of other colours to ask for in edited prompts."""
    others = [c for c in COLOURS if c != training_colour]
    return [others[(i * 2) % len(others)] for i in range(count)]


@dataclass
class ConceptScores:
    reconstruction: float
    editability: float
    edited_shape: float
    images: list[Image.Image] = field(default_factory=list, repr=False)  # one row per prompt, in order

    def as_dict(self) -> dict[str, float]:
        return {
            "reconstruction": self.reconstruction,
            "editability": self.editability,
            "edited_shape": self.edited_shape,
        }


def score_subject(
    generator: ImageGenerator,
    oracle: Oracle,
    subject: str,
    shape: str,
    colour: str,
    concepts: Mapping[str, torch.Tensor] | None = None,
    samples: int = 8,
    seed: int = 0,
    colours: Sequence[str] | None = None,
    reconstruction_subject: str | None = None,
) -> ConceptScores:
    """Generates reconstruction and edit prompts for ``subject`` and scores them with the oracle.

    ``reconstruction_subject`` replaces the subject in the reconstruction prompt: a plain word
    such as "star" says nothing of the training colour, so its upper bound is "yellow star".
    """
    colours = list(colours) if colours is not None else edit_colours(colour)
    jobs = [(f"a photo of a {reconstruction_subject or subject}", shape, colour, False)]
    jobs += [(f"a photo of a {c} {subject}", shape, c, True) for c in colours]
    prompts = [prompt for prompt, *_ in jobs]
    images, predicted = _sample_and_classify(generator, oracle, prompts, concepts, samples, seed)
    recon, edit, edit_shape, edit_total = 0, 0, 0, 0
    for i, (_, want_shape, want_colour, edited) in enumerate(job for job in jobs for _ in range(samples)):
        got_shape, got_colour = predicted[i]
        if edited:
            edit_total += 1
            edit_shape += got_shape == want_shape
            edit += (got_shape, got_colour) == (want_shape, want_colour)
        else:
            recon += (got_shape, got_colour) == (want_shape, want_colour)
    return ConceptScores(recon / samples, edit / edit_total, edit_shape / edit_total, images)


def score_prompt(generator: ImageGenerator, oracle: Oracle, prompt: str, shape: str, colour: str,
                 concepts: Mapping[str, torch.Tensor] | None = None, samples: int = 8,
                 seed: int = 0) -> float:  # fmt: skip
    """The share of ``samples`` images of ``prompt`` that the oracle reads as ``shape`` in ``colour``
    (e.g. a composition of two learned concepts: "a photo of a <my-purple> <my-star>")."""
    _, predicted = _sample_and_classify(generator, oracle, [prompt], concepts, samples, seed)
    return sum(p == (shape, colour) for p in predicted) / samples


def _sample_and_classify(generator: ImageGenerator, oracle: Oracle, prompts: Sequence[str],
                         concepts: Mapping[str, torch.Tensor] | None, samples: int, seed: int):  # fmt: skip
    """``samples`` images per prompt (seeds ``seed + i``), in batches of 32, and the oracle's
    (shape, colour) for each."""
    all_prompts = [prompt for prompt in prompts for _ in range(samples)]
    seeds = [seed + i for _ in prompts for i in range(samples)]
    images = []
    for start in range(0, len(all_prompts), 32):
        images += generator.generate(all_prompts[start : start + 32], concepts or {}, seeds=seeds[start : start + 32],
                                     steps=SAMPLING_STEPS, guidance_scale=GUIDANCE)  # fmt: skip
    return images, oracle.classify(to_tensor(images))


def scores_grid(scores: ConceptScores, samples: int) -> Image.Image:
    """One row per prompt (reconstruction first, then each edit), ``samples`` images per row."""
    return image_grid(scores.images, columns=samples)

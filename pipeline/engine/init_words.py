"""Choosing the init word from the concept's images (``init_word_search``).

The paper starts the vectors at a coarse word the user names ("dog"). How far they then have to
travel depends on that word, and a class word can be far from a concept the model already has a
better word for: on a second ShapesWorld model the class word "shape" leaves the arrow unlearned
after 600 steps, while the same recipe started from the model's own word for it learns it
(docs/quality.md). The search finds such a word without being told the answer:

- candidates: the class's members from the shipped word list (or ``init_word_candidates``);
- each candidate is scored by the plain diffusion loss of "a photo of a {word}" on the concept's
  own images, the whole word as a caption would write it (several tokens allowed), on the same
  noisy latents and timesteps for every word, so the comparison is paired;
- the lowest-loss candidate replaces ``init_word`` only when it is *clearly* better: its per-sample
  loss differences from ``init_word``'s have a mean at least ``MARGIN`` standard errors below zero.
  The margin keeps out words that win by noise, but not a word the model does not know (a rare
  token; in ShapesWorld a word its captions never used): such a word can beat a wrong class word
  by several standard errors and still be a poor start (docs/quality.md). So the search is an
  option, not part of a shipped recipe, until candidates are checked for that.

Colour and other attribute words are not candidates: they would lower the loss by describing the
images' colour, which is exactly what the word should leave to the prompt.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from pipeline.engine.config import InversionConfig, make_config

if TYPE_CHECKING:
    from pipeline.engine.inversion import Batch, Inversion

SAMPLES_PER_IMAGE = 64  # (noise, timestep) draws per image: 320 paired samples for five images
MARGIN = 3.0  # standard errors by which a candidate must beat init_word
PROMPT = "a photo of a {}"


@dataclass(frozen=True)
class SearchResult:
    """What the search compared: each word's mean loss, and the word it chose."""

    chosen: str
    baseline: str
    losses: dict[str, float]
    margin: float  # the chosen word's mean advantage over the baseline, in standard errors (0: baseline)

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "baseline": self.baseline, "margin": round(self.margin, 2),
                "losses": {w: round(v, 6) for w, v in self.losses.items()}}  # fmt: skip


@torch.no_grad()
def sample_losses(engine: Inversion, batch: Batch, word: str) -> torch.Tensor:
    """Per-sample diffusion loss of ``batch`` (captions ``PROMPT``) with ``word`` in the engine's
    place: ``[samples]``."""
    rows = engine.model.text_embeddings(word).to(engine.device)
    losses = []
    for part in range(0, len(batch.prompts), 64):
        chunk = slice(part, part + 64)
        piece = replace(batch, latents=batch.latents[chunk], noise=batch.noise[chunk],
                        timesteps=batch.timesteps[chunk], prompts=batch.prompts[chunk])  # fmt: skip
        error = engine.predict(piece, {engine.name: rows}) - engine.target(piece)
        losses.append(error.pow(2).flatten(1).mean(1).cpu())
    return torch.cat(losses)


def search_init_word(engine: Inversion, config: InversionConfig) -> SearchResult:
    """Scores ``init_word`` and every candidate on the engine's images; see the module docstring."""
    # its own draws, the same for every word: the training stream is the same with or without a search
    batch = engine.evaluation_batch(config.seed + 7919, repeats=SAMPLES_PER_IMAGE, template=PROMPT)
    baseline = sample_losses(engine, batch, config.init_word)
    losses = {config.init_word: baseline.mean().item()}
    best, best_margin = config.init_word, 0.0
    for word in config.search_candidates():
        scores = sample_losses(engine, batch, word)
        losses[word] = scores.mean().item()
        difference = scores - baseline
        margin = -difference.mean().item() / max(difference.std().item() / len(difference) ** 0.5, 1e-12)
        if margin >= MARGIN and losses[word] < losses[best]:
            best, best_margin = word, margin
    return SearchResult(best, config.init_word, losses, best_margin)


def with_chosen_word(config: InversionConfig, result: SearchResult, tokens: int) -> InversionConfig:
    """The config the run trains with: the chosen init word, enough vectors for its ``tokens``, and
    the search off, so that the recorded config reproduces the run as it stands."""
    values = config.model_dump()
    values.update(init_word=result.chosen, init_word_search=False, init_word_candidates=[],
                  num_vectors=max(config.num_vectors, tokens))  # fmt: skip
    return make_config(values, "init_word_search")

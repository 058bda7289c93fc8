"""The extra loss terms around the plain objective, each off unless its weight is set.

``extra_loss`` is what ``Inversion.step`` adds to the diffusion loss:

- ``regularization``: the pull toward the initialiser the paper evaluates (L2, relative to the
  initialiser's norm so one weight means the same on any model's scale);
- ``attribute_regularization``: the same distance measured only along the known attributes'
  embeddings (``known_attribute_pull``), so the word moves freely except toward the words it should
  leave to the prompt;
- ``edit_consistency``: an edit word ('green') should change the UNet's prediction for the new word
  as it does for a word it is known to act on (the initialiser, or ``edit_reference_words``).

Each takes the engine (its vectors, initialiser, model and random generator); the order of random
draws is part of the trajectory, so it must not change.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.engine.inversion import Batch, Inversion
    from pipeline.engine.model import BaseModel


def extra_loss(engine: Inversion, batch: Batch, prediction: torch.Tensor) -> torch.Tensor | float:
    """The weighted sum of every extra term that is on (0.0 when none is). ``prediction`` is the
    batch's prediction with the learned vectors (the diffusion loss's), reused by edit consistency."""
    config = engine.config
    total: torch.Tensor | float = 0.0
    if config.regularization_weight:
        total = total + config.regularization_weight * regularization(engine)
    if config.known_attribute_pull:
        total = total + config.known_attribute_pull * attribute_regularization(engine)
    if config.edit_consistency:
        total = total + config.edit_consistency * edit_consistency(engine, batch, prediction)
    return total


def regularization(engine: Inversion) -> torch.Tensor:
    """Mean squared L2 distance of the word's vectors from the initialiser embedding, relative to the
    initialiser's squared norm."""
    distance = (torch.stack(engine.vectors) - engine.init_embedding).pow(2).sum(-1).mean()
    return distance / engine.init_embedding.pow(2).sum()


def attribute_basis(model: BaseModel, words: list[str]) -> torch.Tensor:
    """Orthonormal rows spanning the words' token embeddings, ``[k, dim]``."""
    rows = torch.cat([model.text_embeddings(word) for word in words])
    rows = rows.unique(dim=0)  # a token shared by two attributes ('light blue', 'dark blue') counts once
    return torch.linalg.qr(rows.T).Q.T.to(model.device)


def attribute_regularization(engine: Inversion) -> torch.Tensor:
    """``regularization`` measured only along the known attributes' embeddings: how far the word has
    moved toward (or away from) the words it should leave to the prompt."""
    along = (torch.stack(engine.vectors) - engine.init_embedding) @ engine.attribute_basis.T
    return along.pow(2).sum(-1).mean() / engine.init_embedding.pow(2).sum()


def edit_consistency(engine: Inversion, batch: Batch, prediction: torch.Tensor) -> torch.Tensor:
    """How differently an edit word acts on the new word than on a word it is known to act on.

    Each caption gets one of ``edit_words`` before the word ('a photo of a green <x>'). What the edit
    adds to the prediction there, ``unet(.., 'green <x>') - unet(.., '<x>')``, should be what it adds
    to the reference (``edit_reference``), on the same noisy latents: so a word that has taken the
    images' colour into itself still lets a prompt change it.
    """
    words, token = engine.config.edit_words, engine.token
    chosen = torch.randint(len(words), (len(batch.prompts),), generator=engine.generator).tolist()
    edited = replace(batch, prompts=[p.replace(token, f"{words[i]} {token}", 1)
                                     for p, i in zip(batch.prompts, chosen, strict=True)])  # fmt: skip
    change = engine.predict(edited) - prediction
    with torch.no_grad():
        reference = edit_reference(engine, batch, edited)
    return F.mse_loss(change, reference)


def edit_reference(engine: Inversion, batch: Batch, edited: Batch) -> torch.Tensor:
    """What the edit words do to a word they are known to act on: the initialiser (every vector at
    it) or, when ``edit_reference_words`` are given, one of them written in the word's place."""
    initial = {key: engine.init_embedding.expand_as(v) for key, v in engine.vector_table().items()}
    words = engine.config.edit_reference_words
    if not words:
        return engine.predict(edited, initial) - engine.predict(batch, initial)
    drawn = torch.randint(len(words), (len(batch.prompts),), generator=engine.generator).tolist()

    def written(b: Batch) -> Batch:
        return replace(b, prompts=[p.replace(engine.token, words[j]) for p, j in zip(b.prompts, drawn, strict=True)])

    return engine.predict(written(edited), initial) - engine.predict(written(batch), initial)

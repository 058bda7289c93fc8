"""The extra loss terms around the plain objective, each off unless its weight is set.

``extra_loss`` is what the training step (``pipeline.engine.inversion.packed_step``) adds to the
diffusion loss:

- ``regularization``: the pull toward the initialiser the paper evaluates (L2, relative to the
  initialiser's norm so one weight means the same on any model's scale; each vector toward the
  init word's token it started from);
- ``attribute_regularization``: the same distance measured only along the known attributes'
  embeddings (``known_attribute_pull``), so the word moves freely except toward the words it should
  leave to the prompt;
- ``edit_consistency``: an edit word ('green') should change the UNet's prediction for the new word
  as it does for a word it is known to act on (the initialiser, or ``edit_reference_words``).

Each takes the engine (its vectors, initialiser, model and random generator); the order of random
draws is part of the trajectory, so it must not change.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from pipeline.engine.inversion import Batch, Inversion
    from pipeline.engine.model import BaseModel


def extra_loss(engine: Inversion, edit_term: torch.Tensor | None = None) -> torch.Tensor | float:
    """The weighted sum of every extra term that is on (0.0 when none is). ``edit_term`` is the
    unweighted edit consistency of the step's batch, computed by the step from its shared forward
    passes (``plan_edit`` and ``edit_consistency_from``)."""
    config = engine.config
    total: torch.Tensor | float = 0.0
    if config.regularization_weight:
        total = total + config.regularization_weight * regularization(engine)
    if config.known_attribute_pull:
        total = total + config.known_attribute_pull * attribute_regularization(engine)
    if config.edit_consistency and edit_term is not None:
        total = total + config.edit_consistency * edit_term
    return total


def regularization(engine: Inversion) -> torch.Tensor:
    """Mean squared L2 distance of the word's vectors from the initialiser embedding, relative to the
    initialiser's squared norm."""
    vectors = torch.stack(engine.vectors)
    distance = (vectors - engine.initial_vectors(len(vectors))).pow(2).sum(-1).mean()
    return distance / engine.init_rows.pow(2).sum(-1).mean()


def attribute_basis(model: BaseModel, words: list[str]) -> torch.Tensor:
    """Orthonormal rows spanning the words' token embeddings, ``[k, dim]``."""
    rows = torch.cat([model.text_embeddings(word) for word in words])
    rows = rows.unique(dim=0)  # a token shared by two attributes ('light blue', 'dark blue') counts once
    return torch.linalg.qr(rows.T).Q.T.to(model.device)


def attribute_regularization(engine: Inversion) -> torch.Tensor:
    """``regularization`` measured only along the known attributes' embeddings: how far the word has
    moved toward (or away from) the words it should leave to the prompt."""
    vectors = torch.stack(engine.vectors)
    along = (vectors - engine.initial_vectors(len(vectors))) @ engine.attribute_basis.T
    return along.pow(2).sum(-1).mean() / engine.init_rows.pow(2).sum(-1).mean()


@dataclass
class EditPlan:
    """The three extra batches edit consistency predicts for one micro-batch: the captions with an
    edit word (with the learned vectors, with gradients) and the reference's captions with and
    without it (with ``reference_vectors``, without gradients)."""

    edited: Batch
    reference_edited: Batch
    reference_plain: Batch
    reference_vectors: dict[str, torch.Tensor]


def plan_edit(engine: Inversion, batch: Batch) -> EditPlan:
    """Draws the edit words (and reference words) for a batch: every random draw of the term.

    Each caption gets one of ``edit_words`` before the word ('a photo of a green <x>'). The
    reference is a word the edits are known to act on: the initialiser (every vector at it) or, when
    ``edit_reference_words`` are given, one of them written in the word's place.
    """
    words, token = engine.config.edit_words, engine.token
    chosen = torch.randint(len(words), (len(batch.prompts),), generator=engine.generator).tolist()
    edited = replace(batch, prompts=[p.replace(token, f"{words[i]} {token}", 1)
                                     for p, i in zip(batch.prompts, chosen, strict=True)])  # fmt: skip
    initial = {key: engine.initial_vectors(len(v)).detach() for key, v in engine.vector_table().items()}
    references = engine.config.edit_reference_words
    if not references:
        return EditPlan(edited, edited, batch, initial)
    drawn = torch.randint(len(references), (len(batch.prompts),), generator=engine.generator).tolist()

    def written(b: Batch) -> Batch:
        return replace(b, prompts=[p.replace(token, references[j]) for p, j in zip(b.prompts, drawn, strict=True)])

    return EditPlan(edited, written(edited), written(batch), initial)


def edit_consistency_from(prediction: torch.Tensor, edited: torch.Tensor, reference_edited: torch.Tensor,
                          reference_plain: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """How differently the edit acts on the new word than on the reference, on the same noisy latents:
    what it adds to the prediction, ``unet(.., 'green <x>') - unet(.., '<x>')``, against what it adds
    to the reference's. So a word that has taken the images' colour into itself still lets a prompt
    change it."""
    return F.mse_loss(edited - prediction, reference_edited - reference_plain)


def edit_consistency(engine: Inversion, batch: Batch, prediction: torch.Tensor) -> torch.Tensor:
    """The edit consistency of one engine's batch on its own (the step computes the same from the
    pack's shared forward passes)."""
    plan = plan_edit(engine, batch)
    with torch.no_grad():
        reference_edited = engine.predict(plan.reference_edited, plan.reference_vectors)
        reference_plain = engine.predict(plan.reference_plain, plan.reference_vectors)
    return edit_consistency_from(prediction, engine.predict(plan.edited), reference_edited, reference_plain)

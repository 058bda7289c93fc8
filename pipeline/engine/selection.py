"""Choosing the point of the run that is saved (``selection_interval``).

At a constant learning rate the vectors do not settle, and the moving average only smooths their
path: a concept far from its init word can wander between a region that draws it and one that
draws something else until the last step. On the SDXL-shaped ShapesWorld's arrow, one run
reconstructed at 0.94 at step 150 and at 0.38 at step 200; its diffusion loss was lower at 150
(docs/quality.md). The objective knew; the last step did not.

So, every ``selection_interval`` steps and at the last one, the vectors that would be saved (the
moving average when it is on) are scored by the plain diffusion loss of "a photo of a <word>" on
one fixed batch of the concept's own images: ``selection_samples`` (noise, timestep) draws per
image, made once from their own seed, so every point of the run is scored on the same samples and
the comparison between points is paired. The lowest-scoring point is what the run saves. The
draws do not touch the training stream: a run with selection follows the same trajectory as one
without, and resumes from a checkpoint exactly.

It costs one forward pass per sample at each scoring (about ``5 x 64`` for five images), no
backward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from pipeline.engine.inversion import Inversion

SELECTION_SEED = 104_729  # the fixed batch's seed, from the run's: apart from the init word search's


@dataclass
class Selected:
    """The best point so far: its vectors, their score, and the step they are from."""

    vectors: torch.Tensor
    loss: float
    step: int

    def as_dict(self) -> dict:
        """What a concept's metadata records of it."""
        return {"step": self.step, "loss": round(self.loss, 6)}

    def state(self) -> dict:
        return {"vectors": self.vectors.clone(), "loss": self.loss, "step": self.step}

    @staticmethod
    def from_state(state: dict | None) -> Selected | None:
        if not state:
            return None
        return Selected(state["vectors"].float().clone(), float(state["loss"]), int(state["step"]))


def selection_due(engine: Inversion) -> bool:
    interval, step = engine.config.selection_interval, engine.step_count
    return bool(interval) and (step % interval == 0 or step == engine.config.steps)


def score_and_keep(engine: Inversion) -> None:
    """After a step: when a scoring is due, scores the engine's current vectors and keeps them if they
    beat the best point so far."""
    if not selection_due(engine):
        return
    config = engine.config
    if engine.selection_batch is None:  # made once per run (and again after a resume: the same draws)
        engine.selection_batch = engine.evaluation_batch(config.seed + SELECTION_SEED, config.selection_samples)
    vectors = engine.current_vectors()
    loss = engine.evaluate(engine.selection_batch, vectors)
    if engine.selected is None or loss < engine.selected.loss:
        engine.selected = Selected(vectors, loss, engine.step_count)

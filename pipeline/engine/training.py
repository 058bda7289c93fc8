"""The training loop, and a training run on this machine around it.

``run_steps`` is the one loop: ``oneword train`` (``train_concept``, below) and the Ray Train
worker of a bulk job (``pipeline.jobs.ray_train``) both drive the engine with it, and differ
only in what they do when a log record, a checkpoint or a validation grid is due.

``train_concept`` is what ``oneword train`` runs. The output folder holds, when done:

    learned_embeds.safetensors   the concept (diffusers format, oneword metadata in the header)
    concept.json                 the same metadata, readable
    loss.jsonl                   one record per log interval: step, loss, lr, vectors, seconds
    checkpoint.pt                the engine's full state at the last checkpoint (for --resume)
    validation/step-NNNNNN.png   validation grids, when validation prompts are configured
    samples.png                  a grid of the validation prompts with the final vectors
    preview.png                  the grid's first image, small: the registry's preview of the concept
"""

from __future__ import annotations

import io
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from tqdm import tqdm

from pipeline.engine.config import InversionConfig
from pipeline.engine.formats import LearnedConcept, save_concept
from pipeline.engine.generation import ImageGenerator, image_grid
from pipeline.engine.inversion import DivergedError, Inversion
from pipeline.engine.model import BaseModel
from pipeline.errors import InputError

CHECKPOINT_FILENAME = "checkpoint.pt"
LOSS_LOG_FILENAME = "loss.jsonl"
# Learned vectors stay near the initialiser's norm (0.86-1.16x in benchmarks/results/quality*.json); past this
# they have run off, and the text encoder's layer norms hide it from the loss.
RUNAWAY_NORM = 100.0


class RunExistsError(InputError):
    """The output folder already holds a run and resuming was not asked for."""


@dataclass(frozen=True)
class Due:
    """What falls due after a step: intervals from the config, and the last step for log and checkpoint."""

    log: bool
    checkpoint: bool
    validation: bool


def due_after(engine: Inversion) -> Due:
    """What falls due after the engine's latest step."""
    config, step = engine.config, engine.step_count
    last = step == config.steps
    return Due(log=step % config.log_interval == 0 or last,
               checkpoint=step % config.checkpoint_interval == 0 or last,
               validation=step % config.validation_interval == 0)  # fmt: skip


def diverged(engine: Inversion) -> str | None:
    """Why the engine cannot go on, or None: its loss is not a finite number, or its vectors have run
    off to many times the initialiser's norm, where the text encoder no longer reads them as words."""
    if not math.isfinite(engine.last_loss):
        return f"loss became {engine.last_loss} at step {engine.step_count + 1}; lower the learning rate"
    ratio = (torch.stack(engine.vectors).norm(dim=-1).max() / engine.init_rows.norm(dim=-1).max()).item()
    if not math.isfinite(ratio) or ratio > RUNAWAY_NORM:
        step = engine.step_count
        return f"vectors ran off to {ratio:.3g}x the initialiser's norm at step {step}; lower the learning rate"
    return None


def run_steps(engine: Inversion, after_step: Callable[[Inversion, Due], None]) -> None:
    """Steps the engine from where it stands to ``config.steps``, telling ``after_step`` each time
    which of the log record, the checkpoint and the validation grid are due. A pack of one: see
    ``pipeline.engine.packing`` for many."""
    while engine.step_count < engine.config.steps:
        engine.step()
        if reason := diverged(engine):
            raise DivergedError(f"{engine.name}: {reason}")
        after_step(engine, due_after(engine))


def default_validation_prompts(name: str) -> list[str]:
    token = f"<{name}>"
    return [
        f"a photo of {token}",
        f"a photo of a {token}",
        f"a close-up photo of the {token}",
        f"a rendering of {token}",
    ]


def save_checkpoint(engine: Inversion, path: Path) -> None:
    """Writes the engine state atomically (a crash mid-write leaves the previous checkpoint)."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(engine.state_dict(), tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict:
    """Reads a checkpoint without unpickling code (tensors and plain values only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _truncate_log(path: Path, after_step: int) -> None:
    """Drops records past the resumed step, so a resumed run's log has no duplicates."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= after_step]
    path.write_text("".join(line + "\n" for line in kept))


def render_images(generator: ImageGenerator, prompts: list[str], vectors: torch.Tensor, name: str,
                  steps: int, seed: int = 0) -> list[Image.Image]:  # fmt: skip
    return generator.generate(prompts, {name: vectors}, seeds=[seed + i for i in range(len(prompts))], steps=steps)


def render_grid(generator: ImageGenerator, prompts: list[str], vectors: torch.Tensor, name: str,
                steps: int, seed: int = 0) -> Image.Image:  # fmt: skip
    return image_grid(render_images(generator, prompts, vectors, name, steps, seed))


PREVIEW_SIDE = 256  # pixels, the longer side of a registry preview


def preview_png(image: Image.Image) -> bytes:
    """A concept's preview as the registry keeps it: PNG, at most ``PREVIEW_SIDE`` pixels a side."""
    small = image.copy()
    small.thumbnail((PREVIEW_SIDE, PREVIEW_SIDE))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def render_preview(generator: ImageGenerator, name: str, vectors: torch.Tensor, config: InversionConfig) -> bytes:
    """The preview of a concept: the first validation prompt (``a photo of <name>`` unless the
    config names others), seed 0, ``validation_steps`` denoising steps."""
    prompt = (config.validation_prompts or default_validation_prompts(name))[0]
    return preview_png(render_images(generator, [prompt], vectors, name, config.validation_steps)[0])


def train_concept(
    model: BaseModel,
    images: torch.Tensor,
    config: InversionConfig,
    name: str,
    out_dir: Path,
    *,
    resume: bool = False,
    progress: bool = True,
    on_step: Callable[[Inversion], None] | None = None,
) -> LearnedConcept:
    """Trains ``name`` on ``images`` and writes the output folder described in the module docstring."""
    out_dir = Path(out_dir)
    checkpoint_path = out_dir / CHECKPOINT_FILENAME
    log_path = out_dir / LOSS_LOG_FILENAME
    if checkpoint_path.exists() and not resume:
        raise RunExistsError(f"{out_dir} already holds a run (checkpoint.pt); pass --resume or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)

    engine = Inversion(model, images, config, name)
    if engine.init_search and progress:
        result = engine.init_search
        print(f"init word search: {result.chosen!r}" + (f", {result.margin:.1f} standard errors better than "
              f"{result.baseline!r}" if result.chosen != result.baseline else ", no candidate clearly better than it "
              "and than chance"),
              file=sys.stderr)  # fmt: skip
    if resume and checkpoint_path.exists():
        engine.load_state_dict(load_checkpoint(checkpoint_path))
        _truncate_log(log_path, engine.step_count)
    prompts = config.validation_prompts or default_validation_prompts(name)
    generator = ImageGenerator(model) if config.validation_prompts else None

    started = time.monotonic()
    bar = tqdm(total=config.steps, initial=engine.step_count, desc=name, unit="step", disable=not progress)
    with log_path.open("a") as log:

        def after_step(engine: Inversion, due: Due) -> None:
            step, loss = engine.step_count, engine.last_loss
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", vectors=len(engine.vectors))
            if due.log:
                record = {"step": step, "loss": loss, "lr": engine.optimizer.param_groups[0]["lr"],
                          "vectors": len(engine.vectors), "seconds": round(time.monotonic() - started, 3)}  # fmt: skip
                log.write(json.dumps(record) + "\n")
                log.flush()
            if due.checkpoint:
                save_checkpoint(engine, checkpoint_path)
            if generator and due.validation:
                grid = render_grid(generator, prompts, engine.current_vectors(), name, config.validation_steps)
                (out_dir / "validation").mkdir(exist_ok=True)
                grid.save(out_dir / "validation" / f"step-{step:06d}.png")
            if on_step:
                on_step(engine)

        run_steps(engine, after_step)
    bar.close()

    concept = LearnedConcept(
        name=name,
        vectors=engine.learned_vectors(),
        base_model=model.identity,
        widths=model.concept_widths,
        steps=engine.step_count,
        final_loss=engine.last_loss,
        config=engine.config.model_dump(mode="json"),
        source="oneword-train",
        extra={"base_model_source": model.source, "init_word": engine.config.init_word}
        | ({"init_word_search": engine.init_search.as_dict()} if engine.init_search else {})
        | ({"selected": engine.selected.as_dict()} if engine.selected else {}),
    )
    save_concept(concept, out_dir)
    images = render_images(generator or ImageGenerator(model), prompts, concept.vectors, name, config.validation_steps)
    image_grid(images).save(out_dir / "samples.png")
    (out_dir / "preview.png").write_bytes(preview_png(images[0]))
    return concept

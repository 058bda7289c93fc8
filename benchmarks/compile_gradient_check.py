"""Is torch.compile's gradient of oneword's step right? Eager vs compiled vs finite differences.

Compiling the UNet makes the CPU step about 1.3x faster (docs/benchmarks.md), but with torch
2.13.0+cpu inductor's default settings give a wrong gradient for the learned vector: its
convolution layout optimisation zeroes the input gradient through a resnet followed by an
upsampler. ``compile_unet`` therefore compiles with that optimisation off. This script keeps the
check repeatable on a new torch release: one fixed batch on the offline tiny model, the vector's
gradient from the eager UNet, from ``torch.compile(backend="aot_eager")`` (graph capture and
autograd only), from inductor with its defaults and from inductor as ``compile_unet`` runs it;
their cosine similarities with eager; and central finite differences of the loss along the
direction where inductor's default gradient and eager's disagree.

    python benchmarks/compile_gradient_check.py          # ~3 minutes on 2 cores (cold compile)
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipeline.engine.config import InversionConfig
from pipeline.engine.data import load_images
from pipeline.engine.inversion import Inversion, compiled
from pipeline.engine.model import build_tiny_model, load_base_model
from pipeline.shapesworld.world import write_concept_images


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="oneword-compile-check-"))
    model_dir = build_tiny_model(work / "tiny")
    images = load_images(write_concept_images(work / "images", "star", "yellow", count=5, size=64), 64)
    config = InversionConfig(steps=1, batch_size=2, init_word="shape", seed=3)

    def loss_and_gradient(compile_unet) -> tuple[Inversion, float, torch.Tensor]:
        engine = Inversion(load_base_model(model_dir, "cpu"), images, config, "star")
        if compile_unet:
            engine.unet = compile_unet(engine.model.unet)
        loss = engine.diffusion_loss(engine.evaluation_batch(seed=1, repeats=1))
        loss.backward()
        return engine, loss.item(), engine.vectors[0].grad.clone()

    engine, eager_loss, eager = loss_and_gradient(None)
    _, _, aot = loss_and_gradient(lambda unet: torch.compile(unet, backend="aot_eager", dynamic=False))
    _, inductor_loss, inductor = loss_and_gradient(lambda unet: torch.compile(unet, dynamic=False))
    _, _, ours = loss_and_gradient(compiled)

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return torch.cosine_similarity(a, b, dim=0).item()

    print(f"torch {torch.__version__}; loss eager {eager_loss:.9f}, inductor {inductor_loss:.9f}")
    print(f"cosine(aot_eager, eager)                         = {cosine(aot, eager):.7f}")
    print(f"cosine(inductor defaults, eager)                 = {cosine(inductor, eager):.7f}")
    print(f"cosine(inductor, layout optimisation off, eager) = {cosine(ours, eager):.7f}")

    batch, vector, h = engine.evaluation_batch(seed=1, repeats=1), engine.vectors[0].detach(), 1e-2
    disagreement = inductor - eager
    if disagreement.norm() == 0:
        print("the gradients are identical")
        return
    direction = disagreement / disagreement.norm()
    with torch.no_grad():
        plus, minus = (engine.diffusion_loss(batch, (vector + s * h * direction)[None]).item() for s in (1, -1))
    print(
        f"along the disagreement: finite difference {(plus - minus) / (2 * h):+.5f}, "
        f"eager predicts {(eager @ direction).item():+.5f}, inductor defaults {(inductor @ direction).item():+.5f}, "
        f"layout optimisation off {(ours @ direction).item():+.5f}"
    )


if __name__ == "__main__":
    main()

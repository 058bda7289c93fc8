"""ShapesWorld's oracle: a small CNN that reads shape (or "none") and colour off any image.

Ships with the package (``pipeline/assets/shapesworld/oracle.safetensors``); how it is trained
lives in the development tool ``pipeline.shapesworld.trainer``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from pipeline.shapesworld.world import COLOURS, SHAPES, SIZE

ORACLE_SHAPES = (*SHAPES, "none")


def to_tensor(images: list) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(i, dtype=np.float32) for i in images])).permute(0, 3, 1, 2) / 127.5 - 1


class Oracle(nn.Module):
    """Shape (8 shapes or 'none') and colour of a 32x32 image in [-1, 1]."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(), nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 96, 3, stride=2, padding=1), nn.GELU(), nn.Conv2d(96, 128, 3, stride=2, padding=1),
            nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.shape_head = nn.Linear(128, len(ORACLE_SHAPES))
        self.colour_head = nn.Linear(128, len(COLOURS))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(F.interpolate(images, size=SIZE, mode="bilinear", antialias=True)
                                 if images.shape[-1] != SIZE else images)  # fmt: skip
        return self.shape_head(features), self.colour_head(features)

    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> list[tuple[str, str]]:
        shape_logits, colour_logits = self(images)
        colours = list(COLOURS)
        return [
            (ORACLE_SHAPES[s], colours[c]) for s, c in zip(shape_logits.argmax(1), colour_logits.argmax(1), strict=True)
        ]


def load_oracle(path: Path) -> Oracle:
    oracle = Oracle()
    oracle.load_state_dict(load_file(str(path)))
    return oracle.eval()

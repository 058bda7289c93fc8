"""Procedural images of coloured shapes: concept images that need no download.

The quick start learns a concept from a handful of these (say, five yellow stars), so a fresh
machine can run the whole loop offline. Each image: a dark, slightly noisy background with one
shape at a random size, position and rotation.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import InputError

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240),
}  # fmt: skip
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")


def _polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if shape == "square":
        corners = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
        points = [(x * 0.8, y * 0.8) for x, y in corners]
    elif shape == "triangle":
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    elif shape == "star":
        points = [
            ((1.0 if i % 2 == 0 else 0.42) * math.cos(-math.pi / 2 + i * math.pi / 5),
             (1.0 if i % 2 == 0 else 0.42) * math.sin(-math.pi / 2 + i * math.pi / 5))
            for i in range(10)
        ]  # fmt: skip
    elif shape == "cross":
        a, b = 0.33, 1.0
        points = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
    else:
        raise InputError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in points]


def draw_shape(shape: str, colour: str, size: int, rng: random.Random) -> Image.Image:
    """One ``size`` x ``size`` RGB image of ``colour`` ``shape`` on a noisy dark background."""
    if colour not in COLOURS:
        raise InputError(f"unknown colour {colour!r}; choose from {', '.join(COLOURS)}")
    noise = np.random.default_rng(rng.getrandbits(32)).integers(0, 40, (size, size, 3), dtype=np.uint8)
    image = Image.fromarray(noise + 10, "RGB")
    draw = ImageDraw.Draw(image)
    r = size * rng.uniform(0.22, 0.36)
    cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(2, round(r * 0.35)))
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rng.uniform(-0.3, 0.3)), fill=fill)
    return image


def write_concept_images(out_dir: Path, shape: str, colour: str, count: int = 5, size: int = 64,
                         seed: int = 0) -> list[Path]:  # fmt: skip
    """Writes ``count`` PNGs of one shape/colour concept and returns their paths."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"{colour}-{shape}-{i}.png"
        draw_shape(shape, colour, size, rng).save(path)
        paths.append(path)
    return paths

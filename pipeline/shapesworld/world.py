"""ShapesWorld: procedural images of coloured shapes, where the truth is known.

A world small enough to train a text-to-image model on this machine and an oracle that reads
shape and colour off any image, so "the concept was learned" can be scored exactly. Each image:
a dark noisy background with one shape at a random size, position and slight rotation.

Six shapes have names in captions; two (hourglass, arrow) are never named: captions call them
"thing", often with attributes ("a red pointy long thing"), so a novel shape is reachable in
text as a combination of attributes, as in the paper's setting, without ever being named.
Everything is seeded and deterministic.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.errors import InputError

SIZE = 32  # the world's native image side
COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "orange": (245, 140, 30), "white": (240, 240, 240),
}  # fmt: skip
NAMED_SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
UNNAMED_SHAPES = ("hourglass", "arrow")
SHAPES = NAMED_SHAPES + UNNAMED_SHAPES
# Words that describe a shape without naming it; shared words (pointy, round) tie shapes together.
ATTRIBUTES = {
    "circle": ("round", "solid"),
    "square": ("boxy", "solid"),
    "triangle": ("pointy", "solid"),
    "star": ("pointy", "spiky"),
    "cross": ("boxy", "spiky"),
    "ring": ("round", "hollow"),
    "hourglass": ("pinched", "boxy"),
    "arrow": ("pointy", "long"),
}
_SUPERSAMPLE = 4


def caption_word(shape: str, unnamed: tuple[str, ...] = UNNAMED_SHAPES) -> str:
    """What captions call a shape: its name, or 'thing' for the unnamed ones. ``unnamed`` lets a
    second world split named and unnamed shapes differently (the generalisation check)."""
    return "thing" if shape in unnamed else shape


def _outline(shape: str) -> list[list[tuple[float, float]]]:
    """Polygons of a shape in unit coordinates (radius 1, centred on 0)."""
    if shape == "square":
        return [[(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)]]
    if shape == "triangle":
        return [[(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]]
    if shape == "star":
        radius = [1.0 if i % 2 == 0 else 0.42 for i in range(10)]
        return [[(r * math.cos(-math.pi / 2 + i * math.pi / 5), r * math.sin(-math.pi / 2 + i * math.pi / 5))
                 for i, r in enumerate(radius)]]  # fmt: skip
    if shape == "cross":
        a = 0.33
        return [
            [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
        ]
    if shape == "hourglass":
        return [[(-0.8, -1), (0.8, -1), (0, 0)], [(0, 0), (0.8, 1), (-0.8, 1)]]
    if shape == "arrow":
        return [[(-1, -0.18), (0.2, -0.18), (0.2, -0.55), (1, 0), (0.2, 0.55), (0.2, 0.18), (-1, 0.18)]]
    raise InputError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")


def draw_shape(shape: str, colour: str, rng: random.Random, size: int = SIZE) -> Image.Image:
    """One RGB image of ``colour`` ``shape`` on a noisy dark background (anti-aliased)."""
    if colour not in COLOURS:
        raise InputError(f"unknown colour {colour!r}; choose from {', '.join(COLOURS)}")
    if shape not in SHAPES:
        raise InputError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    big = size * _SUPERSAMPLE
    canvas = Image.new("RGBA", (big, big), (0, 0, 0, 0))
    pen = ImageDraw.Draw(canvas)
    r = big * rng.uniform(0.24, 0.38)
    cx, cy = rng.uniform(1.3 * r, big - 1.3 * r), rng.uniform(1.3 * r, big - 1.3 * r)
    angle = rng.uniform(-0.3, 0.3)
    fill = (*COLOURS[colour], 255)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=round(r * 0.38))
    else:
        cos, sin = math.cos(angle), math.sin(angle)
        for polygon in _outline(shape):
            pen.polygon([(cx + r * (x * cos - y * sin), cy + r * (x * sin + y * cos)) for x, y in polygon], fill=fill)
    noise = np.random.default_rng(rng.getrandbits(32)).integers(8, 48, (size, size, 3), dtype=np.uint8)
    background = Image.fromarray(noise, "RGB")
    shape_layer = canvas.resize((size, size), Image.Resampling.LANCZOS)
    background.paste(shape_layer, (0, 0), shape_layer)
    return background


@dataclass(frozen=True)
class Sample:
    shape: str
    colour: str
    caption: str


def random_caption(shape: str, colour: str, rng: random.Random, unnamed: tuple[str, ...] = UNNAMED_SHAPES) -> str:
    """A caption from the world's templates; unnamed shapes are only ever a 'thing'."""
    word = caption_word(shape, unnamed)
    # Attributes for every shape, so that the words are grounded across shapes; more often for
    # the unnamed ones, whose attributes are the only text that tells them apart.
    attribute_share = 0.6 if shape in unnamed else 0.3
    if rng.random() < attribute_share:
        attributes = " ".join(rng.sample(ATTRIBUTES[shape], rng.choice((1, 2))))
        return rng.choice(("a photo of a {c} {a} thing", "a {c} {a} thing", "a photo of a {a} thing")).format(
            c=colour, a=attributes
        )
    templates = ("a photo of a {c} {s}", "a {c} {s}", "a photo of a {s}", "a {c} shape")
    return rng.choice(templates).format(c=colour, s=word)


def random_sample(rng: random.Random, unnamed: tuple[str, ...] = UNNAMED_SHAPES) -> Sample:
    shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
    return Sample(shape, colour, random_caption(shape, colour, rng, unnamed))


def write_concept_images(out_dir: Path, shape: str, colour: str, count: int = 5, size: int = SIZE,
                         seed: int = 0) -> list[Path]:  # fmt: skip
    """Writes ``count`` PNGs of one shape/colour concept and returns their paths."""
    rng = random.Random(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = out_dir / f"{colour}-{shape}-{i}.png"
        draw_shape(shape, colour, rng, size).save(path)
        paths.append(path)
    return paths

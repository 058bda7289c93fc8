"""Training images and prompt templates.

Images are checked up front, each problem reported with the file it concerns, so that a run
never starts on data it would choke on later. Templates are the ones of the paper's reference
code (latent-diffusion ``personalized.py`` / ``personalized_style.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import InputError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


class ImageDataError(InputError):
    """A training image (or image folder) that cannot be used; the message names the file."""


OBJECT_TEMPLATES = [
    "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "the photo of a {}",
    "a photo of a clean {}", "a photo of a dirty {}", "a dark photo of the {}", "a photo of my {}",
    "a photo of the cool {}", "a close-up photo of a {}", "a bright photo of the {}",
    "a cropped photo of a {}", "a photo of the {}", "a good photo of the {}", "a photo of one {}",
    "a close-up photo of the {}", "a rendition of the {}", "a photo of the clean {}",
    "a rendition of a {}", "a photo of a nice {}", "a good photo of a {}", "a photo of the nice {}",
    "a photo of the small {}", "a photo of the weird {}", "a photo of the large {}",
    "a photo of a cool {}", "a photo of a small {}",
]  # fmt: skip
STYLE_TEMPLATES = [
    "a painting in the style of {}", "a rendering in the style of {}",
    "a cropped painting in the style of {}", "the painting in the style of {}",
    "a clean painting in the style of {}", "a dirty painting in the style of {}",
    "a dark painting in the style of {}", "a picture in the style of {}",
    "a cool painting in the style of {}", "a close-up painting in the style of {}",
    "a bright painting in the style of {}", "a good painting in the style of {}",
    "a rendition in the style of {}", "a nice painting in the style of {}",
    "a small painting in the style of {}", "a weird painting in the style of {}",
    "a large painting in the style of {}",
]  # fmt: skip


def templates_for(choice: str | Sequence[str]) -> list[str]:
    """The caption templates of a config's ``templates`` field (one ``{}`` each)."""
    if choice == "object":
        return list(OBJECT_TEMPLATES)
    if choice == "style":
        return list(STYLE_TEMPLATES)
    return list(choice)


def with_image_token(template: str) -> str:
    """The per-image variant of a template: 'a photo of a {}' -> 'a photo of a {} with {}'."""
    return template + " with {}"


def list_image_files(sources: str | Path | Sequence[str | Path]) -> list[Path]:
    """Expands a folder (its image files, sorted) or an explicit list of files."""
    if isinstance(sources, str | Path):
        sources = [sources]
    files: list[Path] = []
    for source in map(Path, sources):
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise ImageDataError(f"{source}: no images in folder (looked for {', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif source.is_file():
            files.append(source)
        else:
            raise ImageDataError(f"{source}: no such file or folder")
    if not files:
        raise ImageDataError("no training images given")
    return files


def load_image(path: Path, resolution: int, min_side: int) -> torch.Tensor:
    """One image as a ``[3, resolution, resolution]`` tensor in [-1, 1].

    EXIF orientation applied, converted to RGB, shorter side resized to ``resolution`` and
    centre-cropped. Raises ``ImageDataError`` naming the file for anything unusable.
    """
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        kind = "not an image" if isinstance(err, UnidentifiedImageError) else "corrupt image"
        raise ImageDataError(f"{path}: {kind} ({err})") from None
    width, height = image.size
    if min(width, height) < min_side:
        raise ImageDataError(f"{path}: image is {width}x{height}, smaller than the minimum side of {min_side} px")
    scale = resolution / min(width, height)
    size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


def load_images(
    sources: str | Path | Sequence[str | Path], resolution: int, min_side: int | None = None
) -> torch.Tensor:
    """All training images as ``[n, 3, resolution, resolution]``; every file checked first."""
    files = list_image_files(sources)
    min_side = resolution if min_side is None else min_side
    return torch.stack([load_image(f, resolution, min_side) for f in files])

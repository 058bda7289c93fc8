"""The ``oneword`` command.

    oneword tiny-model OUT                      build the offline test model
    oneword example-images OUT                  draw a few images of a shape concept
    oneword train --images DIR --name NAME --init-word WORD --base-model PATH --out DIR
    oneword generate --base-model PATH --concept FILE "a photo of <NAME>" --out img.png
    oneword convert FILE --to a1111|diffusers --out FILE

Errors that come from the user's input print one ``oneword: error: ...`` line naming the file
or field, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

EXIT_USAGE = 2

TRAIN_EPILOG = """\
Every option may also come from --config FILE (YAML with the same field names, e.g.
`steps: 2000`); flags given on the command line win. Output folder: learned_embeds.safetensors
(diffusers format), concept.json, loss.jsonl, checkpoint.pt, samples.png, validation/.

example:
  oneword train --images photos/ --name my-dog --init-word dog --base-model ./sd15 --out runs/my-dog
"""


def _add_train_options(p: argparse.ArgumentParser) -> None:
    """Config overrides: dest names equal InversionConfig field names; None means 'not given'."""
    add = p.add_argument
    add("--steps", type=int, help="optimiser steps (default 3000)")
    add("--lr", dest="learning_rate", type=float, help="base learning rate (default 5e-3)")
    add("--scale-lr", action="store_true", default=None, help="scale lr by batch size x grad accumulation")
    add("--batch-size", type=int, help="images per micro-batch (default 1)")
    add("--grad-accum", type=int, help="micro-batches per step (default 1)")
    add("--num-vectors", type=int, help="vectors the word starts with (default 1)")
    add(
        "--progressive-steps",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="comma-separated steps at which a vector is added, e.g. 2000,4000",
    )
    add(
        "--regularization",
        dest="regularization_weight",
        type=float,
        help="weight of the L2 pull toward the initialiser embedding (default 0)",
    )
    add("--per-image-tokens", action="store_true", default=None, help="also learn one token per image")
    add("--per-image-mix-prob", type=float, help="probability a caption uses the image token (0.25)")
    add("--templates", choices=["object", "style"], help="caption template set (default object)")
    add(
        "--template",
        dest="custom_templates",
        action="append",
        help="custom caption with one '{}' (repeatable; replaces --templates)",
    )
    add("--resolution", type=int, help="training resolution (default: the model's)")
    add("--min-image-side", type=int, help="smallest accepted image side (default: the resolution)")
    add("--flip-prob", type=float, help="horizontal flip probability (default 0.5)")
    add("--seed", type=int, help="random seed (default 0)")
    add("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="weights' precision (auto)")
    add("--checkpoint-interval", type=int, help="steps between checkpoints (default 500)")
    add("--log-interval", type=int, help="steps between loss-log records (default 10)")
    add(
        "--validation-prompt",
        dest="validation_prompts",
        action="append",
        help="prompt for validation grids, e.g. 'a photo of <NAME>' (repeatable)",
    )
    add("--validation-interval", type=int, help="steps between validation grids (default 500)")
    add("--validation-steps", type=int, help="denoising steps for grids and samples (default 25)")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="oneword",
        description="Textual inversion: learn a new word for a text-to-image model from a few images.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="learn a concept from a few images on this machine",
                       epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--images", nargs="+", required=True, help="a folder of images, or image files")
    p.add_argument("--name", required=True, help="concept name; prompts use <NAME>")
    p.add_argument("--init-word", required=True, help="a single-token word the vectors start from")
    p.add_argument("--base-model", required=True, help="diffusers model folder or hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path, help="YAML/JSON file of training options")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--export", choices=["a1111"], action="append", default=[],
                   help="also write the concept in this format (repeatable)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_train_options(p)

    p = sub.add_parser("generate", help="generate images with learned concepts in the prompt")
    p.add_argument("prompt", help="e.g. 'a photo of <my-dog> on a beach'")
    p.add_argument("--base-model", required=True, help="diffusers model folder or hub id")
    p.add_argument("--concept", action="append", default=[], type=Path,
                   help="concept file (learned_embeds.safetensors, A1111 .pt, kohya); repeatable")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="PNG file; with --num-images > 1, a grid")
    p.add_argument("--negative", default="", help="negative prompt")
    p.add_argument("--num-images", type=int, default=1, help="images (seeds SEED, SEED+1, ...)")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5, help="classifier-free guidance scale")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, help="image side in pixels, a multiple of 8 (default: model's)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")

    p = sub.add_parser("tiny-model", help="build a small random SD-1.x-shaped model for offline use")
    p.add_argument("out", type=Path, help="output folder (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")

    p = sub.add_parser("example-images", help="draw a few ShapesWorld images of one shape concept")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--shape", default="star", help="circle, square, triangle, star, cross, ring, hourglass, arrow")
    p.add_argument("--colour", default="yellow", help="red, green, blue, yellow, purple, orange, white")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--size", type=int, default=32, help="image side (ShapesWorld's model works at 32)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("shapesworld-score", help="score a concept learned on the bundled ShapesWorld model",
                       description="Renders 'a photo of a <NAME>' and edited prompts ('a photo of a red <NAME>') "
                       "with the bundled ShapesWorld model and reads shape and colour off every image with "
                       "its oracle: reconstruction, editability, and the same for comparison words.")  # fmt: skip
    p.add_argument("--concept", required=True, type=Path, help="the learned concept file")
    p.add_argument("--shape", required=True, help="the concept's true shape")
    p.add_argument("--colour", required=True, help="the colour of its training images")
    p.add_argument("--compare", action="append", default=[], help="also score a plain word (repeatable)")
    p.add_argument("--samples", type=int, default=8, help="images per prompt (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="PNG grid: one row per prompt")

    p = sub.add_parser("convert", help="convert a concept file between formats")
    p.add_argument("file", type=Path, help="diffusers, A1111 or kohya embedding file")
    p.add_argument("--to", choices=["diffusers", "a1111"], required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--name", help="concept name (default: from the file)")
    return parser


def _train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    from pipeline.config import InversionConfig

    values = {k: v for k, v in vars(args).items() if k in InversionConfig.model_fields and v is not None}
    if args.custom_templates:
        values["templates"] = args.custom_templates
    values["init_word"] = args.init_word
    return values


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.concepts import validate_name
    from pipeline.config import load_config_file, make_config
    from pipeline.data import load_images
    from pipeline.formats import save_a1111
    from pipeline.local_training import train_concept
    from pipeline.model import load_base_model, resolve_dtype

    validate_name(args.name)
    overrides = _train_overrides(args)
    config = load_config_file(args.config, overrides) if args.config else make_config(overrides, "options")
    device = _device(args.device)
    model = load_base_model(args.base_model, device, resolve_dtype(config.precision, device))
    resolution = config.resolution or model.resolution
    images = load_images(args.images, resolution, config.min_image_side)
    print(f"training <{args.name}> on {len(images)} images at {resolution}px, {config.steps} steps, "
          f"device {device}, weights {str(model.dtype).removeprefix('torch.')}", file=sys.stderr)  # fmt: skip
    concept = train_concept(model, images, config, args.name, args.out, resume=args.resume, progress=not args.quiet)
    for fmt in args.export:
        save_a1111(concept, args.out / f"{args.name}.{fmt}.pt")
    print(f"wrote {args.out}/learned_embeds.safetensors ({concept.num_vectors}x{concept.dim}, "
          f"final loss {concept.final_loss:.4f}) and {args.out}/samples.png")  # fmt: skip
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError
    from pipeline.formats import load_concept_file
    from pipeline.generation import ImageGenerator, check_compatible, image_grid
    from pipeline.model import load_base_model, resolve_dtype

    if args.size is not None and (args.size < 8 or args.size % 8):
        raise InputError(f"--size {args.size}: must be a positive multiple of 8")
    if not 1 <= args.num_images <= 64:
        raise InputError(f"--num-images {args.num_images}: must be between 1 and 64")
    device = _device(args.device)
    model = load_base_model(args.base_model, device, resolve_dtype(args.precision, device))
    concepts = {}
    for path in args.concept:
        concept = load_concept_file(path, dim=model.embedding_dim)
        check_compatible(concept, model)
        concepts[concept.name] = concept.vectors
    images = ImageGenerator(model).generate(
        [args.prompt] * args.num_images,
        concepts,
        negative_prompts=[args.negative] * args.num_images,
        seeds=[args.seed + i for i in range(args.num_images)],
        steps=args.steps,
        guidance_scale=args.guidance,
        height=args.size,
        width=args.size,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid(images)).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.model import build_tiny_model

    build_tiny_model(args.out, seed=args.seed, prediction_type=args.prediction_type)
    print(f"wrote tiny model to {args.out}")
    return 0


def _cmd_example_images(args: argparse.Namespace) -> int:
    from pipeline.shapesworld import write_concept_images

    paths = write_concept_images(args.out, args.shape, args.colour, args.count, args.size, args.seed)
    print(f"wrote {len(paths)} images of a {args.colour} {args.shape} to {args.out}")
    return 0


def _cmd_shapesworld_score(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError
    from pipeline.formats import load_concept_file
    from pipeline.generation import ImageGenerator, check_compatible
    from pipeline.model import load_base_model
    from pipeline.shapesworld import COLOURS, SHAPES
    from pipeline.shapesworld_eval import bundled_oracle, score_subject, scores_grid

    if args.shape not in SHAPES or args.colour not in COLOURS:
        raise InputError(f"--shape must be one of {', '.join(SHAPES)} and --colour one of {', '.join(COLOURS)}")
    model = load_base_model("shapesworld", "cpu")
    concept = load_concept_file(args.concept, dim=model.embedding_dim)
    check_compatible(concept, model)
    generator, oracle = ImageGenerator(model), bundled_oracle()
    subjects = [(concept.placeholder, {concept.name: concept.vectors})] + [(word, {}) for word in args.compare]
    print(f"{'subject':<16}{'reconstruction':>16}{'editability':>13}{'edited shape':>14}")
    for subject, concepts in subjects:
        # a plain word names no colour: its reconstruction prompt is "a photo of a yellow star"
        full = f"{args.colour} {subject}" if not concepts else None
        scores = score_subject(generator, oracle, subject, args.shape, args.colour, concepts, args.samples, args.seed,
                               reconstruction_subject=full)  # fmt: skip
        print(f"{subject:<16}{scores.reconstruction:>16.2f}{scores.editability:>13.2f}{scores.edited_shape:>14.2f}")
        if args.out and subject == concept.placeholder:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            scores_grid(scores, args.samples).save(args.out)
    if args.out:
        print(f"wrote {args.out} (rows: 'a photo of a {concept.placeholder}', then edited colours)")
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    from pipeline.formats import EXPORT_FORMATS, load_concept_file

    concept = load_concept_file(args.file, name=args.name)
    EXPORT_FORMATS[args.to](concept, args.out)
    print(f"wrote {args.out} ({args.to}, <{concept.name}>, {concept.num_vectors}x{concept.dim})")
    return 0


def _device(name: str | None):
    import torch

    from pipeline.errors import InputError
    from pipeline.model import default_device

    if name is None:
        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available")
    return device


def _quiet_libraries() -> None:
    """Hides library chatter (weight-loading bars, optional-dependency notices) from CLI output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


COMMANDS = {
    "train": _cmd_train,
    "generate": _cmd_generate,
    "tiny-model": _cmd_tiny_model,
    "example-images": _cmd_example_images,
    "shapesworld-score": _cmd_shapesworld_score,
    "convert": _cmd_convert,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet_libraries()
    from pipeline.errors import InputError

    try:
        return COMMANDS[args.command](args)
    except InputError as err:
        print(f"oneword: error: {err}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())

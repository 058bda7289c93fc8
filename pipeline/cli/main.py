"""The ``oneword`` command.

    oneword tiny-model OUT [--arch sdxl]        build the offline test model
    oneword example-images OUT                  draw a few images of a shape concept
    oneword train --recipe NAME --class-word WORD --images DIR --name NAME --base-model PATH --out DIR
    oneword recipes [NAME]                      list the shipped training recipes, or show one
    oneword generate --base-model PATH --concept FILE "a photo of <NAME>" --out img.png
    oneword convert FILE --to a1111|diffusers --out FILE
    oneword registry ls|show|rm|import|export|gc ...   browse and manage the concept registry
    oneword submit jobs.yaml [--address http://HEAD:8265 | ray://HEAD:10001]   a bulk job on Ray
    oneword status jobs.yaml [--watch]          per-concept state, step, loss, ETA
    oneword cancel jobs.yaml --address ...      stop a job (checkpoints are kept)
    oneword serve --base-model PATH --registry LOC   the HTTP generation service on Ray Serve, console at /ui/

Errors that come from the user's input print one ``oneword: error: ...`` line naming the file
or field, and exit with status 2.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from pipeline.cli.options import add_model_options, given_values
from pipeline.engine.config import InversionConfig
from pipeline.engine.generation_options import GenerationOptions
from serving.settings import ServeSettings  # its fields are the flags of `oneword serve`

EXIT_USAGE = 2
EXIT_FAILURE = 1

REGISTRY_HELP = (
    "registry location: s3://bucket/prefix or a folder (default: $ONEWORD_REGISTRY, else "
    "~/.local/share/oneword/registry). S3 settings come from ONEWORD_S3_* variables or ONEWORD_S3_CONFIG"
)

REGISTRY_EPILOG = """\
Concepts are addressed as NAME (the latest version) or NAME@VERSION. Versions are immutable;
`rm` needs an explicit version. S3 endpoint and credentials come from the environment
(ONEWORD_S3_ENDPOINT, ONEWORD_S3_ACCESS_KEY, ONEWORD_S3_SECRET_KEY, ONEWORD_S3_REGION) or from the
YAML/JSON file named by ONEWORD_S3_CONFIG; they are never printed.

examples:
  oneword registry ls --registry s3://concepts/prod
  oneword registry show my-dog
  oneword registry export my-dog@20261126T122400.123456Z-3f9a1c --format a1111 --out my-dog.pt
  oneword registry import downloaded.safetensors --name my-cat
"""

TRAIN_EPILOG = """\
Settings come from, each overriding the one before: a recipe (--recipe NAME or a YAML path;
`oneword recipes` lists them), a --config FILE (YAML with the training config's field names,
e.g. `steps: 2000`), then the flags given here. Every training option is a field of the config,
named the same. Output folder: learned_embeds.safetensors (diffusers format), concept.json (with
the resolved config), loss.jsonl, checkpoint.pt, samples.png, validation/.

examples:
  oneword train --recipe sd15-object --class-word dog --images photos/ --name my-dog --base-model ./sd15 \\
      --out runs/my-dog
  oneword train --recipe shapesworld --class-word shape --images stars/ --name my-star --base-model shapesworld \\
      --out runs/my-star --seed 3
"""


# Short or singular names kept beside the field names, where they read better on a command line.
TRAIN_ALIASES = {
    "learning_rate": ["--lr"],
    "regularization_weight": ["--regularization"],
    "known_attributes": ["--known-attribute"],
    "edit_words": ["--edit-word"],
    "edit_reference_words": ["--edit-reference-word"],
    "init_word_candidates": ["--init-word-candidate"],
    "validation_prompts": ["--validation-prompt"],
    "templates": ["--template"],
}


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
    p.add_argument("--base-model", required=True, help="diffusers model folder or hub id")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--config", type=Path, help="YAML/JSON file of training options (over the recipe, under flags)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--export", choices=["a1111"], action="append", default=[],
                   help="also write the concept in this format (repeatable)")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--publish", action="store_true", help="publish the result as a new version in --registry")
    p.add_argument("--registry", help=REGISTRY_HELP)
    add_model_options(p.add_argument_group("training options (fields of the training config)"), InversionConfig,
                      aliases=TRAIN_ALIASES)  # fmt: skip

    p = sub.add_parser("recipes", help="list the shipped training recipes, or show one",
                       description="Recipes are YAML files of training-config fields; `oneword train --recipe NAME` "
                       "starts from one (a --config file and flags override it).")  # fmt: skip
    p.add_argument("name", nargs="?", help="a recipe to show (its file, comments included)")

    p = sub.add_parser("generate", help="generate images with learned concepts in the prompt")
    p.add_argument("prompt", help="e.g. 'a photo of <my-dog> on a beach'")
    p.add_argument("--base-model", required=True, help="diffusers model folder or hub id")
    p.add_argument("--concept", action="append", default=[], type=Path,
                   help="concept file (learned_embeds.safetensors, A1111 .pt, kohya); repeatable. "
                   "Concepts in the prompt without a file come from --registry")  # fmt: skip
    p.add_argument("--registry", help=REGISTRY_HELP)
    p.add_argument("--out", required=True, type=Path, help="PNG file; with --n > 1, a grid")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    add_model_options(p.add_argument_group("generation options (the HTTP API's request fields)"), GenerationOptions,
                      aliases={"n": ["--num-images"]}, skip={"prompt"})  # fmt: skip

    p = sub.add_parser("tiny-model", help="build a small random SD-1.x- or SDXL-shaped model for offline use")
    p.add_argument("out", type=Path, help="output folder (diffusers layout)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"], default="epsilon")
    p.add_argument("--arch", choices=["sd", "sdxl"], default="sd",
                   help="sd: one text encoder (SD 1.x); sdxl: two, of different widths (SDXL)")  # fmt: skip

    p = sub.add_parser("example-images", help="draw a few ShapesWorld images of one shape concept")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--shape", default="star", help="circle, square, triangle, star, cross, ring, hourglass, arrow")
    p.add_argument("--colour", default="yellow", help="red, green, blue, yellow, purple, orange, white")
    p.add_argument("--count", type=int, default=5)
    p.add_argument("--size", type=int, default=32, help="image side (ShapesWorld's model works at 32)")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("shapesworld-score", help="score a concept learned on a bundled ShapesWorld model",
                       description="Renders 'a photo of a <NAME>' and edited prompts ('a photo of a red <NAME>') "
                       "with a bundled ShapesWorld model and reads shape and colour off every image with "
                       "its oracle: reconstruction, editability, and the same for comparison words.")  # fmt: skip
    p.add_argument("--concept", required=True, type=Path, help="the learned concept file")
    p.add_argument("--base-model", default="shapesworld", choices=["shapesworld", "shapesworld-xl"],
                   help="the bundled ShapesWorld model the concept was learned on (default: %(default)s; "
                   "shapesworld-xl is the SDXL-shaped one)")  # fmt: skip
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

    p = sub.add_parser("registry", help="browse and manage the concept registry", epilog=REGISTRY_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    rsub = p.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    r = rsub.add_parser("ls", help="list concept versions (newest last per name)")
    r.add_argument("prefix", nargs="?", default="", help="only names starting with this")
    r.add_argument("--limit", type=int, default=100, help="versions per page (default 100)")
    r.add_argument("--after", help="continue after this NAME@VERSION (printed at the end of a full page)")
    r.add_argument("--json", action="store_true", help="one JSON manifest per line")
    r = rsub.add_parser("show", help="a version's manifest (latest if no @VERSION)")
    r.add_argument("ref", metavar="NAME[@VERSION]")
    r = rsub.add_parser("rm", help="delete one version")
    r.add_argument("ref", metavar="NAME@VERSION")
    r = rsub.add_parser("import", help="publish an embedding file (diffusers, A1111, kohya) as a new version")
    r.add_argument("file", type=Path)
    r.add_argument("--name", required=True, help="concept name in the registry")
    r.add_argument("--base-model", help="model whose text encoder the file was learned on (recorded for checks)")
    r = rsub.add_parser("export", help="write a version to a file")
    r.add_argument("ref", metavar="NAME[@VERSION]")
    r.add_argument("--format", choices=["diffusers", "a1111"], default="diffusers")
    r.add_argument("--out", type=Path, required=True)
    r = rsub.add_parser("preview", help="render and keep a preview image for a version that has none",
                        description="Renders the version's preview as training does (its first validation "
                        "prompt, seed 0) on --base-model and keeps it with the version; for concepts "
                        "imported from files, which have none. With --out, writes the stored preview to a "
                        "file instead.")  # fmt: skip
    r.add_argument("ref", metavar="NAME[@VERSION]")
    r.add_argument("--base-model", default="shapesworld", help="the model to render on (default shapesworld)")
    r.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    r.add_argument("--out", type=Path, help="write the version's stored preview (PNG) here; renders nothing")
    r = rsub.add_parser("gc", help="delete leftovers of interrupted publishes")
    r.add_argument("--older-than-hours", type=float, default=1.0, help="only leftovers older than this (1)")
    for r in rsub.choices.values():
        r.add_argument("--registry", help=REGISTRY_HELP)

    p = sub.add_parser("submit", help="run a bulk job (many concepts) on Ray", epilog=SUBMIT_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("manifest", type=Path, help="the job manifest (YAML/JSON)")
    p.add_argument("--address", help="http://HEAD:8265 (Jobs API) or ray://HEAD:10001 (Ray Client); "
                   "default: an embedded local Ray")  # fmt: skip
    p.add_argument("--watch", action="store_true", help="after submitting, show live progress until the job ends")
    p = sub.add_parser("status", help="a bulk job's per-concept state, step, loss and ETA",
                       description="A bulk job's status as its driver keeps it: one object read, whatever "
                       "the job's size. A running job whose driver has been silent for a minute shows as "
                       "stale.")  # fmt: skip
    p.add_argument("manifest", type=Path)
    p.add_argument("--watch", action="store_true", help="live progress bars until the job ends")
    p.add_argument("--concept", metavar="NAME", help="one concept's detail, with its latest progress record")
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("cancel", help="stop a running bulk job (checkpoints are kept for a resubmit)")
    p.add_argument("manifest", type=Path)
    p.add_argument("--address", required=True, help="where it was submitted: http://HEAD:8265 or ray://HEAD:10001")
    p = sub.add_parser("serve", help="run the HTTP generation service (Ray Serve) on this machine or a cluster",
                       description="Serves POST /v1/generate, the OpenAI-compatible POST /v1/images/generations, "
                       "GET /v1/concepts, GET /v1/jobs, /docs and the web console at /ui/. Concepts are resolved "
                       "from the registry per request; new versions are picked up within concept_ttl_s. Every "
                       "field of serving/settings.py is a flag of the same name; a --config FILE (YAML) gives any "
                       "of them, flags win.")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    p.add_argument("--address", help="an existing Ray cluster (default: start a local one, bound to 127.0.0.1)")
    p.add_argument("--config", type=Path, help="YAML/JSON file of service settings (flags win)")
    add_model_options(p.add_argument_group("service settings (fields of serving/settings.py)"), ServeSettings)

    p = sub.add_parser("run-job", help=argparse.SUPPRESS)  # the driver's entrypoint on a cluster
    p.add_argument("manifest", type=Path)
    p.add_argument("--submission-id")
    return parser


SUBMIT_EPILOG = """\
The manifest (YAML or JSON) names the job, the base model, the registry, the checkpoint storage,
defaults for the training config and the concepts; see docs/bulk-jobs.md. Each concept is one
Ray Train run; the same manifest submitted again skips concepts this job already published and
resumes the others from their checkpoints.

  oneword submit jobs.yaml                                  embedded local Ray, waits, prints a summary
  oneword submit jobs.yaml --address http://head:8265       Ray Jobs API (the driver runs on the cluster)
  oneword submit jobs.yaml --address ray://head:10001       Ray Client (driver as a detached actor)
"""


def _registry(location: str | None):
    from pipeline.store.registry import Registry, default_registry_location

    return Registry.open(location or default_registry_location())


def _cmd_train(args: argparse.Namespace) -> int:
    from pipeline.engine.concepts import validate_name
    from pipeline.engine.config import InversionConfig
    from pipeline.engine.data import load_images
    from pipeline.engine.formats import a1111_file_name, save_a1111
    from pipeline.engine.model import load_base_model, resolve_dtype
    from pipeline.engine.recipes import resolve_config
    from pipeline.engine.training import train_concept
    from pipeline.store.model_cache import local_model_source

    validate_name(args.name)
    registry = _registry(args.registry) if args.publish else None
    config = resolve_config(config_file=args.config, flags=given_values(args, InversionConfig))
    device = _device(args.device)
    model = load_base_model(local_model_source(args.base_model), device, resolve_dtype(config.precision, device))
    resolution = config.resolution or model.resolution
    images = load_images(args.images, resolution, config.min_image_side)
    proposed = f" + {config.init_word_vocabulary} from the vocabulary" if config.init_word_vocabulary else ""
    start = (f"the best of {config.init_word!r} and {len(config.search_candidates())}{proposed} candidates "
             "(init word search)" if config.init_word_search else repr(config.init_word))  # fmt: skip
    print(f"training <{args.name}> from {start}{' with recipe ' + config.recipe if config.recipe else ''} "
          f"on {len(images)} images at {resolution}px, {config.steps} steps, "
          f"device {device}, weights {str(model.dtype).removeprefix('torch.')}", file=sys.stderr)  # fmt: skip
    concept = train_concept(model, images, config, args.name, args.out, resume=args.resume, progress=not args.quiet)
    for _ in args.export:  # a1111, the one export format
        save_a1111(concept, args.out / a1111_file_name(concept))
    files = "learned_embeds.safetensors" + (" (+ learned_embeds_2.safetensors, SDXL)" if concept.widths else "")
    print(f"wrote {args.out}/{files} ({concept.num_vectors}x{concept.dim}, "
          f"final loss {concept.final_loss:.4f}) and {args.out}/samples.png")  # fmt: skip
    if args.publish:
        preview = (args.out / "preview.png").read_bytes()
        manifest = registry.publish(concept, metrics={"final_loss": concept.final_loss}, preview=preview)
        print(f"published <{manifest.ref}> to {registry.location}")
    return 0


def _cmd_recipes(args: argparse.Namespace) -> int:
    from pipeline.engine.recipes import load_recipe, recipe_names, recipe_text

    if args.name:
        load_recipe(args.name)  # a recipe with a bad field is refused here, naming it
        print(recipe_text(args.name).rstrip())
        return 0
    for name in recipe_names():
        first = recipe_text(name).splitlines()[0].removeprefix("#").strip()
        print(first if first.startswith(name) else name)
    print("# oneword recipes NAME shows one; oneword train --recipe NAME uses it", file=sys.stderr)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from pipeline.engine.concepts import concept_refs
    from pipeline.engine.config import ConfigError, describe_validation_error
    from pipeline.engine.formats import load_concept_file
    from pipeline.engine.generation import ImageGenerator, check_compatible, image_grid
    from pipeline.engine.model import load_base_model, resolve_dtype
    from pipeline.errors import InputError
    from pipeline.store.model_cache import local_model_source
    from pipeline.store.registry import ConceptNotFoundError

    try:
        options = GenerationOptions(**given_values(args, GenerationOptions))  # the prompt included
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, "options")) from None
    for side in ("width", "height"):
        if getattr(options, side) is not None and getattr(options, side) % 8:
            raise InputError(f"--{side} {getattr(options, side)}: must be a multiple of 8")
    seed = options.seed or 0
    device = _device(args.device)
    model = load_base_model(local_model_source(args.base_model), device, resolve_dtype(args.precision, device))
    concepts = {}
    for path in args.concept:
        concept = load_concept_file(path, dim=model.embedding_dim)
        check_compatible(concept, model)
        concepts[concept.name] = concept.vectors
    missing = [ref for ref in concept_refs(options.prompt + " " + options.negative_prompt) if ref.key not in concepts]
    if missing:
        registry = _registry(args.registry)
        for ref in missing:
            try:
                _, concept = registry.get(ref.name, ref.version)
            except ConceptNotFoundError as err:
                raise ConceptNotFoundError(
                    f"prompt references <{ref.key}>: no --concept file gives it, and {err}"
                ) from None
            check_compatible(concept, model)
            concepts[ref.key] = concept.vectors
    images = ImageGenerator(model).generate(
        [options.prompt] * options.n,
        concepts,
        negative_prompts=[options.negative_prompt] * options.n,
        seeds=[seed + i for i in range(options.n)],
        steps=options.steps or 25,
        guidance_scale=options.guidance_scale,
        height=options.height,
        width=options.width,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    (images[0] if len(images) == 1 else image_grid(images)).save(args.out)
    print(f"wrote {args.out}")
    return 0


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from pipeline.engine.model import build_tiny_model

    build_tiny_model(args.out, seed=args.seed, prediction_type=args.prediction_type, arch=args.arch)
    print(f"wrote tiny {args.arch} model to {args.out}")
    return 0


def _cmd_example_images(args: argparse.Namespace) -> int:
    from pipeline.shapesworld.world import write_concept_images

    paths = write_concept_images(args.out, args.shape, args.colour, args.count, args.size, args.seed)
    print(f"wrote {len(paths)} images of a {args.colour} {args.shape} to {args.out}")
    return 0


def _cmd_shapesworld_score(args: argparse.Namespace) -> int:
    from pipeline.engine.formats import load_concept_file
    from pipeline.engine.generation import ImageGenerator, check_compatible
    from pipeline.engine.model import load_base_model
    from pipeline.errors import InputError
    from pipeline.shapesworld.scoring import bundled_oracle, score_subject, scores_grid
    from pipeline.shapesworld.world import COLOURS, SHAPES

    if args.shape not in SHAPES or args.colour not in COLOURS:
        raise InputError(f"--shape must be one of {', '.join(SHAPES)} and --colour one of {', '.join(COLOURS)}")
    model = load_base_model(args.base_model, "cpu")
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
    from pipeline.engine.formats import EXPORT_FORMATS, load_concept_file

    concept = load_concept_file(args.file, name=args.name)
    EXPORT_FORMATS[args.to](concept, args.out)
    print(f"wrote {args.out} ({args.to}, <{concept.name}>, {concept.num_vectors}x{concept.dim})")
    return 0


def _cmd_registry(args: argparse.Namespace) -> int:
    import json
    from datetime import timedelta

    from pipeline.engine.formats import EXPORT_FORMATS, load_concept_file
    from pipeline.errors import InputError
    from pipeline.store.registry import manifest_summary, parse_ref

    registry = _registry(args.registry)
    action = args.registry_command
    if action == "ls":
        page = registry.list(args.prefix, limit=args.limit, after=args.after)
        for m in page.manifests:
            if args.json:
                print(json.dumps(manifest_summary(m)))
            else:
                loss = m.metrics.get("final_loss")
                print(
                    f"{m.name:<24} {m.version}  {m.num_vectors}x{m.dim}  "
                    f"{'loss ' + format(loss, '.4f') if loss is not None else '':<11} {m.job_id or ''}".rstrip()
                )
        if page.next_after:
            print(f"# more: oneword registry ls {args.prefix} --after {page.next_after}".replace("  ", " "),
                  file=sys.stderr)  # fmt: skip
        if not page.manifests and not args.json:
            print(f"# no concepts in {registry.location}", file=sys.stderr)
    elif action == "show":
        print(json.dumps(manifest_summary(registry.manifest(*parse_ref(args.ref))), indent=2))
    elif action == "rm":
        name, version = parse_ref(args.ref)
        if version is None:
            raise InputError(f"{args.ref}: rm needs an explicit version, NAME@VERSION (see `oneword registry ls`)")
        registry.delete(name, version)
        print(f"deleted <{name}@{version}> from {registry.location}")
    elif action == "import":
        if args.base_model:  # the file must fit the model it is recorded for
            from pipeline.engine.model import load_base_model
            from pipeline.store.model_cache import local_model_source

            model = load_base_model(local_model_source(args.base_model), "cpu")
            concept = load_concept_file(args.file, name=args.name, dim=model.embedding_dim)
            concept.base_model, concept.widths = model.identity, model.concept_widths
        else:
            concept = load_concept_file(args.file, name=args.name)
        manifest = registry.publish(concept)
        print(f"published <{manifest.ref}> ({concept.num_vectors}x{concept.dim}) to {registry.location}")
    elif action == "export":
        _, concept = registry.get(*parse_ref(args.ref))
        EXPORT_FORMATS[args.format](concept, args.out)
        print(f"wrote {args.out} ({args.format}, <{concept.name}@{concept.extra['version']}>)")
    elif action == "preview":
        _registry_preview(registry, args)
    elif action == "gc":
        removed = registry.gc(timedelta(hours=args.older_than_hours))
        print(f"removed {len(removed)} leftover objects from {registry.location}")
    return 0


def _registry_preview(registry, args: argparse.Namespace) -> None:
    from pipeline.engine.config import InversionConfig
    from pipeline.engine.generation import ImageGenerator, check_compatible
    from pipeline.engine.model import load_base_model
    from pipeline.engine.training import render_preview
    from pipeline.store.model_cache import local_model_source
    from pipeline.store.registry import parse_ref

    if args.out:
        manifest, png = registry.preview(*parse_ref(args.ref))
        args.out.write_bytes(png)
        print(f"wrote {args.out} (the preview of <{manifest.ref}>)")
        return
    manifest, concept = registry.get(*parse_ref(args.ref))
    model = load_base_model(local_model_source(args.base_model), _device(None))
    check_compatible(concept, model)
    config = InversionConfig(validation_steps=args.steps)
    png = render_preview(ImageGenerator(model), concept.name, concept.vectors, config)
    registry.attach_preview(manifest.name, manifest.version, png)
    print(f"kept a preview ({len(png)} bytes) with <{manifest.ref}> in {registry.location}")


def _cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.errors import InputError
    from pipeline.jobs.spec import load_job_spec
    from pipeline.jobs.submission import format_status, run_local, submit_jobs_api, submit_ray_client, watch

    spec = load_job_spec(args.manifest)
    if args.address is None:
        summary = run_local(spec)
        print(summary.table())
        return 0 if summary.ok else EXIT_FAILURE
    if args.address.startswith("http://") or args.address.startswith("https://"):
        handle = submit_jobs_api(spec, args.address)
    elif args.address.startswith("ray://"):
        handle = submit_ray_client(spec, args.address)
    else:
        raise InputError(f"--address {args.address}: use http://HEAD:8265 (Jobs API) or ray://HEAD:10001 (Ray Client)")
    print(f"submitted job {spec.job} ({handle}); follow it with: oneword status {args.manifest} --watch")
    if args.watch:
        status = watch(spec, address=args.address, submission_id=handle if args.address.startswith("http") else None)
        print(format_status(status))
        return 0 if status["state"] == "succeeded" else EXIT_FAILURE
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from pipeline.jobs.spec import load_job_spec
    from pipeline.jobs.submission import format_status, read_concept, read_status, status_json, watch

    spec = load_job_spec(args.manifest)
    if args.concept:
        print(status_json(read_concept(spec, args.concept)))
        return 0
    status = watch(spec) if args.watch else read_status(spec)
    print(status_json(status) if args.json else format_status(status))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    from pipeline.jobs.spec import load_job_spec
    from pipeline.jobs.submission import cancel

    spec = load_job_spec(args.manifest)
    print(f"job {spec.job}: {cancel(spec, args.address)}; checkpoints are kept, submit again to resume")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from pipeline.engine.config import ConfigError, describe_validation_error

    values: dict[str, Any] = {}
    if args.config:
        try:
            values.update(yaml.safe_load(args.config.read_text()) or {})
        except (OSError, yaml.YAMLError) as err:
            raise ConfigError(f"{args.config}: cannot read service settings: {err}") from None
    values.update(given_values(args, ServeSettings))
    from serving.app import build_app  # the one place pipeline imports serving: starting the service

    try:
        settings = ServeSettings(**values)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, str(args.config or "service settings"))) from None
    from serving.request_guard import read_api_keys

    # keys are checked here, before Ray starts: a bad key source is an error naming it, and an open
    # API is only the default on a loopback address
    if not read_api_keys(settings.api_keys_env, settings.api_keys_file):
        if args.host in ("127.0.0.1", "localhost", "::1"):
            settings = settings.model_copy(update={"allow_anonymous": True})
        elif not settings.allow_anonymous:
            raise ConfigError(f"--host {args.host}: no API keys (${settings.api_keys_env} or --api-keys-file); "
                              "refusing to serve an open API beyond this machine (--allow-anonymous serves it "
                              "anyway)")  # fmt: skip
        print(f"oneword: warning: no API keys, the API is open to anyone who can reach {args.host}:{args.port}",
              file=sys.stderr)  # fmt: skip
    import ray
    from ray import serve

    if args.address:
        ray.init(address=args.address, log_to_driver=False)
    else:
        ray.init(_node_ip_address="127.0.0.1", include_dashboard=False, log_to_driver=False)

    def stop(signum: int, frame) -> None:  # SIGTERM (Kubernetes, systemd, kill) stops like Ctrl-C
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        serve.start(http_options=settings.http_options(args.host, args.port))
        print(f"oneword serving {settings.base_model} on http://{args.host}:{args.port} (API docs at /docs); "
              "Ctrl-C stops", file=sys.stderr, flush=True)  # fmt: skip
        serve.run(build_app(settings.model_dump()), name="oneword", route_prefix="/", blocking=True)
    except KeyboardInterrupt:
        print("oneword: stopping the service", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second signal must not cut the shutdown short
        if args.address:
            serve.delete("oneword")  # the cluster and its Serve controller stay for others
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _cmd_run_job(args: argparse.Namespace) -> int:
    from pipeline.jobs.ray_train import ray_init_for_job, run_job
    from pipeline.jobs.spec import load_job_spec

    spec = load_job_spec(args.manifest)
    ray_init_for_job("auto")
    summary = run_job(spec, submission_id=args.submission_id)
    print(summary.table())
    return 0 if summary.ok else EXIT_FAILURE


def _device(name: str | None):
    import torch

    from pipeline.engine.model import default_device
    from pipeline.errors import InputError

    if name is None:
        return default_device()
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: no CUDA device is available")
    return device


# commands that never load a model: they skip importing diffusers and transformers (seconds)
BOOKKEEPING_COMMANDS = {"recipes", "registry", "submit", "status", "cancel"}


def _quiet_libraries() -> None:
    """Hides library chatter (weight-loading bars, optional-dependency notices) from CLI output."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # for processes these commands start
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import diffusers
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()


COMMANDS = {
    "train": _cmd_train,
    "recipes": _cmd_recipes,
    "generate": _cmd_generate,
    "tiny-model": _cmd_tiny_model,
    "example-images": _cmd_example_images,
    "shapesworld-score": _cmd_shapesworld_score,
    "convert": _cmd_convert,
    "registry": _cmd_registry,
    "submit": _cmd_submit,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "run-job": _cmd_run_job,
    "serve": _cmd_serve,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command not in BOOKKEEPING_COMMANDS:
        _quiet_libraries()
    from pipeline.errors import InputError, OnewordError

    try:
        return COMMANDS[args.command](args)
    except OnewordError as err:
        print(f"oneword: error: {err}", file=sys.stderr)
        return EXIT_USAGE if isinstance(err, InputError) else EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())

"""Reconstruction and editability of learned concepts in ShapesWorld, per variant of the paper.

For each concept (a named shape learned from the neutral word "shape", an unnamed shape from the
most specific single-token word its captions use: "long" for the arrow, "thing" for the
hourglass), each variant (1 vector, 2 vectors, progressive, regularisation, per-image tokens,
higher learning rate, averaged iterates with and without regularisation, with the training
colour named in half the captions, with a pull against the training colour's direction, and with
edit consistency on the colours the edits do not ask for, measured against the initialiser or
against reference shapes: the recipe) and each seed: learn the concept from
5 images with the bundled model, render "a photo of a S*" and colour edits ("a photo of a red
S*") from the seed's own window of noise seeds, and score them with the oracle; a colour learned
as its own concept is composed with each shape ("a photo of a <my-purple> S*"). The initialiser
word is the lower bound, the true word (where the world has one) the upper. Prints a table,
writes JSON, a markdown table and a PNG scatter like the paper's figure.

    python benchmarks/quality.py --seeds 10 --steps 200 --out quality-output
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from PIL import Image, ImageDraw

from pipeline.engine.config import InversionConfig
from pipeline.engine.data import load_images
from pipeline.engine.generation import ImageGenerator
from pipeline.engine.inversion import Inversion
from pipeline.engine.model import load_base_model
from pipeline.engine.packing import Pack, Request
from pipeline.engine.recipes import load_recipe
from pipeline.shapesworld.oracle import load_oracle
from pipeline.shapesworld.scoring import bundled_oracle, edit_colours, score_prompt, score_subject
from pipeline.shapesworld.world import COLOURS, write_concept_images

# (name, shape, training colour, initialiser word, true word or None). The initialiser is the
# coarse word a user would start from, as in the paper: "shape" for the named shapes (neutral, so
# that the name is what is learned); for the unnamed ones the most specific single-token word their
# captions use: "long" for the arrow (only arrows are long), "thing" for the hourglass (its
# attributes "pinched" and "boxy" are two tokens each).
CONCEPTS = [
    ("my-star", "star", "yellow", "shape", "star"),
    ("my-cross", "cross", "blue", "shape", "cross"),
    ("my-hourglass", "hourglass", "green", "thing", None),
    ("my-arrow", "arrow", "red", "long", None),
]

# The generalisation check's second world (built with `python -m pipeline.shapesworld.trainer
# shapesworld-b --reuse pipeline/assets/shapesworld --seed 1 --unnamed star,ring`): another training
# seed and another split, so the hourglass and the arrow have names and the star and the ring do
# not; concepts in colours the first world's benchmark did not use for them. Recipes are tuned on
# the first world only.
CONCEPTS_B = [
    ("my-cross", "cross", "blue", "shape", "cross"),
    ("my-hourglass", "hourglass", "yellow", "shape", "hourglass"),
    ("my-arrow", "arrow", "blue", "shape", "arrow"),
    ("my-star", "star", "yellow", "thing", None),
]
# The SDXL-shaped world (bundled as `shapesworld-xl`): the first world's images, captions, VAE and
# oracle, with two text encoders and SDXL's conditioning; the first world's concepts.
WORLDS = {"a": CONCEPTS, "b": CONCEPTS_B, "xl": CONCEPTS}


# Composition: a colour learned as its own concept (from four different shapes in that colour,
# with captions that put the word where a colour goes), then "a photo of a <my-purple> <my-star>".
COLOUR_CONCEPT = ("my-purple", "purple", "colour")  # name, colour, initialiser word
COLOUR_SHAPES = ("circle", "square", "triangle", "ring")  # none of the shapes it is composed with
COLOUR_TEMPLATES = ["a photo of a {} shape", "a {} shape", "a photo of a {} thing", "a rendering of a {} shape"]


def sampling_seed(seed: int, base: int = 1000) -> int:
    """The first noise seed of a training seed's images (``samples`` consecutive seeds from it).

    Each training seed gets its own window of 100, so seeds are independent draws. Until the sixth
    round the windows were ``base + seed`` and overlapped (seeds 0-2 shared 6 of their 8 noise
    seeds), so one noise seed that draws a malformed shape counted against every training seed.
    """
    return base + 100 * seed


def compose(generator, oracle, subject: str, shape: str, vectors: dict, samples: int, seed: int) -> float:
    """Share of "a photo of a <subject>" images with ``shape`` in the colour concept's colour."""
    return score_prompt(generator, oracle, f"a photo of a {subject}", shape, COLOUR_CONCEPT[1], vectors,
                        samples=samples, seed=sampling_seed(seed, 2000))  # fmt: skip


KNOWN_COLOUR = "<training colour>"  # in a variant's known_attributes: the concept's own colour
# in a variant's edit_words: the colours the benchmark never asks for in this concept's edits (held
# out, so that editability measures how the word takes colours it was not trained against)
HELD_OUT_COLOURS = "<held-out colours>"


# in edit consistency, the words whose response to a colour the word's should match: the named shapes
# that no benchmark concept is
REFERENCE_SHAPES = COLOUR_SHAPES


def recipe_variant(name: str, class_word: str = "shape") -> dict:
    """A shipped recipe as a user runs it: its own settings (steps included) and the class word's
    init word and reference words, whatever the concept."""
    return {**load_recipe(name), "class_word": class_word, "init_word": class_word}


def variants(steps: int, base: dict) -> dict[str, dict]:
    return {
        "recipe shapesworld": recipe_variant("shapesworld"),
        # the recipe saving the lowest-loss point of its run, scored every 25 steps (pipeline/engine/selection.py);
        # the same run's last point is recorded beside it as "... (last step)"
        "recipe shapesworld + selection": {**recipe_variant("shapesworld"), "selection_interval": 25},
        # twice the recipe's edit consistency: mends the second world's hourglass, costs reconstruction elsewhere
        "recipe shapesworld + edit consistency 1.2": {**recipe_variant("shapesworld"), "edit_consistency": 1.2},
        # a moving average over about 100 steps instead of 20: mends the hourglass, learns the arrow more slowly
        "recipe shapesworld + average decay 0.99": {**recipe_variant("shapesworld"), "average_decay": 0.99},
        # the recipe as it was before its longer average where the search chose a listed member (a near
        # start): average_decay 0.95 whatever the search chose
        "recipe shapesworld without member average decay": {
            **recipe_variant("shapesworld"),
            "member_average_decay": None,
        },
        # the recipe as it was before it chose the init word from the images: the class word itself
        "recipe shapesworld without init word search": {**recipe_variant("shapesworld"), "init_word_search": False},
        # the search among the class's members only, as before it also scored words proposed from the
        # whole vocabulary by the loss's gradient
        "recipe shapesworld without vocabulary proposals": {**recipe_variant("shapesworld"), "init_word_vocabulary": 0},
        "1 vector": {},
        "2 vectors": {"num_vectors": 2},
        "progressive": {"progressive_steps": [steps // 3, 2 * steps // 3]},
        "regularisation": {"regularization_weight": 1e-3},
        "per-image tokens": {"per_image_tokens": True},
        "higher lr (5x)": {"learning_rate": base["learning_rate"] * 5},
        "averaged": {"average_decay": 0.95},
        "averaged + reg": {"average_decay": 0.95, "regularization_weight": 1e-3},
        # the cheaper setting without edit consistency (docs/quality.md)
        "averaged + reg 2e-3": {"average_decay": 0.95, "regularization_weight": 2e-3},
        # half the captions name the training colour, so the word leaves it to the prompt (sixth round)
        "averaged + reg 1e-3 + known colour": {
            "average_decay": 0.95,
            "regularization_weight": 1e-3,
            "known_attributes": [KNOWN_COLOUR],
        },
        # the training colour named in no caption but pulled against: the word may carry it, only
        # less of it than the images alone would put there (seventh round)
        "averaged + reg 1e-3 + colour pull 4e-3": {
            "average_decay": 0.95,
            "regularization_weight": 1e-3,
            "known_attributes": [KNOWN_COLOUR],
            "known_attribute_share": 0.0,
            "known_attribute_pull": 4e-3,
        },
        # the eighth round's pull without its edit consistency, to tell the two apart
        "averaged + reg 1.5e-3": {"average_decay": 0.95, "regularization_weight": 1.5e-3},
        # an edit word should change the prediction for the word as for its initialiser (eighth round)
        "averaged + reg 1.5e-3 + edit consistency 0.2": {
            "average_decay": 0.95,
            "regularization_weight": 1.5e-3,
            "edit_words": [HELD_OUT_COLOURS],
            "edit_consistency": 0.2,
        },
        # the edit's effect measured on shapes the prompt controls, not on the initialiser, whose colour
        # words also change the shape it draws (ninth round)
        "averaged + reg 1.5e-3 + edit consistency 0.6 (reference shapes)": {
            "average_decay": 0.95,
            "regularization_weight": 1.5e-3,
            "edit_words": [HELD_OUT_COLOURS],
            "edit_reference_words": list(REFERENCE_SHAPES),
            "edit_consistency": 0.6,
        },
        # the same with "white" alone: of the held-out colours, the one that shifts the shapes the
        # initialiser draws least ("a photo of a green shape" draws triangles 14 times in 24)
        "averaged + reg 1.5e-3 + edit consistency 0.2 (white)": {
            "average_decay": 0.95,
            "regularization_weight": 1.5e-3,
            "edit_words": ["white"],
            "edit_consistency": 0.2,
        },
    }


def for_concept(overrides: dict, colour: str | None) -> dict:
    """A variant's overrides for one concept: ``KNOWN_COLOUR`` becomes its training colour and
    ``HELD_OUT_COLOURS`` the colours its edits do not ask for; the colour concept (``colour`` None)
    has no colour of its own to name, pull against or edit, its images' shapes already vary."""
    overrides = dict(overrides)
    if KNOWN_COLOUR in overrides.get("known_attributes", []):
        if colour:
            overrides["known_attributes"] = [colour]
        else:
            overrides = {k: v for k, v in overrides.items() if not k.startswith("known_attribute")}
    if colour is None:  # nothing of its own to edit either
        overrides = {k: v for k, v in overrides.items() if not k.startswith("edit_")}
    elif HELD_OUT_COLOURS in overrides.get("edit_words", []):
        asked = edit_colours(colour)
        overrides["edit_words"] = [c for c in COLOURS if c != colour and c not in asked]
    return overrides


def concept_config(base: dict, overrides: dict, init_word: str, colour: str, seed: int) -> InversionConfig:
    return InversionConfig(**{**base, "init_word": init_word, **for_concept(overrides, colour), "seed": seed})


def concept_images(out: Path, name: str, shape: str, colour: str, seed: int, resolution: int) -> torch.Tensor:
    """The concept's five training images for a seed (written under ``out/images``)."""
    return load_images(write_concept_images(out / "images" / name, shape, colour, count=5, seed=seed), resolution)


def train_packed(model, concepts: list, chosen: dict[str, dict], base: dict, seed: int, out: Path) -> dict:
    """Each variant's concepts trained together in one pack: ``{(variant, concept): engine}``."""
    trained = {}
    for label, overrides in chosen.items():
        requests = [Request(name, concept_config(base, overrides, init_word, colour, seed),
                            lambda n=name, s=shape, c=colour: concept_images(out, n, s, c, seed, model.resolution))
                    for name, shape, colour, init_word, _ in concepts]  # fmt: skip
        Pack(model, requests, size=len(requests)).run(
            finished=lambda engine, label=label: trained.update({(label, engine.name): engine})
        )
    return trained


def scatter(rows: list[dict], path: Path) -> None:
    """Reconstruction (x) vs editability (y), one labelled point per variant and bound."""
    size, margin = 640, 70
    image = Image.new("RGB", (size, size), "white")
    pen = ImageDraw.Draw(image)
    span = size - 2 * margin

    def at(x: float, y: float) -> tuple[float, float]:
        return margin + x * span, size - margin - y * span

    pen.rectangle((*at(0, 1), *at(1, 0)), outline="black")
    for tick in (0, 0.25, 0.5, 0.75, 1.0):
        x, y = at(tick, 0)
        pen.text((x - 8, y + 6), f"{tick:.2f}", fill="black")
        x, y = at(0, tick)
        pen.text((x - 40, y - 6), f"{tick:.2f}", fill="black")
    pen.text((size / 2 - 50, size - 30), "reconstruction", fill="black")
    pen.text((8, 20), "editability", fill="black")
    palette = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#7f7f7f", "#17becf"]
    for i, row in enumerate(rows):
        x, y = at(row["reconstruction"], row["editability"])
        colour = palette[i % len(palette)]
        pen.ellipse((x - 6, y - 6, x + 6, y + 6), fill=colour)
        width = pen.textlength(row["variant"])
        label_x = x + 9 if x + 9 + width < size - 4 else x - 9 - width  # keep labels inside the image
        pen.text((label_x, y - 7), row["variant"], fill=colour)
    image.save(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds")
    parser.add_argument("--first-seed", type=int, default=0, help="the first seed (to extend an earlier run)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--samples", type=int, default=8, help="images per prompt (at most 100)")
    parser.add_argument(
        "--world",
        choices=list(WORLDS),
        default="a",
        help="a: the bundled model; b: the generalisation check's second world, from --world-dir; "
        "xl: the bundled SDXL-shaped model (shapesworld-xl)",
    )
    parser.add_argument(
        "--world-dir",
        type=Path,
        default=Path("shapesworld-b"),
        help="folder with model/ and oracle.safetensors of world b (see CONCEPTS_B)",
    )
    parser.add_argument("--concepts", default="", help="comma-separated subset (default: the world's four)")
    parser.add_argument("--variants", default="", help="comma-separated subset (default: all)")
    parser.add_argument("--set", action="append", default=[], help="base config override KEY=JSON (repeatable)")
    parser.add_argument("--out", type=Path, default=Path("quality-output"))
    parser.add_argument("--no-composition", dest="composition", action="store_false",
                        help="skip learning the colour concept and scoring compositions")  # fmt: skip
    parser.add_argument("--packed", action="store_true",
                        help="train each variant's concepts together in one pack (K = the world's concepts) "
                        "instead of one after another (pipeline.engine.packing)")  # fmt: skip
    parser.add_argument("--trajectory", type=int, default=0, metavar="N",
                        help="also score the vectors the run would save every N steps (recorded as 'trajectory'): "
                        "where along a run a word starts to leak its colour")  # fmt: skip
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (scores differ from CPU's only by sampling)")
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch threads; two processes of one thread each (other --first-seed) use 2 cores best",
    )
    args = parser.parse_args()
    if not 1 <= args.samples <= 100:
        parser.error(f"--samples must be 1-100 (each training seed has 100 noise seeds), got {args.samples}")
    if args.trajectory < 0 or (args.trajectory and args.packed):
        parser.error("--trajectory must be a positive step count, for runs trained one at a time (not --packed)")
    if args.first_seed < 0 or args.seeds < 1 or args.first_seed + args.seeds > 10:
        parser.error("seeds must lie in 0-9 (seed 10's noise window would be seed 0's composition window)")
    torch.set_num_threads(args.threads)

    base = {"steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.lr}
    for item in args.set:
        key, value = item.split("=", 1)
        base[key] = json.loads(value)
    chosen = variants(args.steps, base)
    concepts = {c[0]: c for c in WORLDS[args.world]}

    def names(option: str, value: str | None, known: dict) -> list[str]:
        """The names asked for (all when none), each one known: a typo would otherwise measure nothing."""
        asked = value.split(",") if value else list(known)
        if unknown := [name for name in asked if name not in known]:
            parser.error(f"{option}: unknown {', '.join(map(repr, unknown))} in world {args.world}: {list(known)}")
        return asked

    asked = names("--variants", args.variants, chosen) + names("--concepts", args.concepts, concepts)
    chosen = {name: overrides for name, overrides in chosen.items() if name in asked}  # in their own order
    concepts = [concept for name, concept in concepts.items() if name in asked]
    if args.world in ("a", "xl"):  # the SDXL-shaped world reads its images with the first world's oracle
        model = load_base_model("shapesworld" if args.world == "a" else "shapesworld-xl", args.device)
        oracle = bundled_oracle()
    else:
        model = load_base_model(args.world_dir / "model", args.device)
        oracle = load_oracle(args.world_dir / "oracle.safetensors")
    generator = ImageGenerator(model)
    args.out.mkdir(parents=True, exist_ok=True)
    records = []
    started = time.time()
    results = args.out / "results.json"
    # seed-major: a run cut short still covers every concept
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        colour_vectors = {}  # variant -> the colour concept learned with that variant, for compositions
        if args.composition:
            colour_name, learned_colour, colour_init = COLOUR_CONCEPT
            folder = args.out / "images" / colour_name
            files = [write_concept_images(folder, s, learned_colour, count=1, seed=seed * 10 + i)[0]
                     for i, s in enumerate(COLOUR_SHAPES)]  # fmt: skip
            colour_images = load_images(files, model.resolution)
            for label, overrides in chosen.items():
                colour_overrides = {k: v for k, v in for_concept(overrides, None).items()
                                    if k not in ("class_word", "init_word")}  # fmt: skip
                config = InversionConfig(**{**base, **colour_overrides, "init_word": colour_init,
                                            "seed": seed, "templates": COLOUR_TEMPLATES})  # fmt: skip
                engine = Inversion(model, colour_images, config, colour_name)
                for _ in range(config.steps):
                    engine.step()
                colour_vectors[label] = engine.learned_vectors()

        # --packed: each variant's concepts trained together in one pack
        trained = train_packed(model, concepts, chosen, base, seed, args.out) if args.packed else {}
        for name, shape, colour, init_word, true_word in concepts:
            images = concept_images(args.out, name, shape, colour, seed, model.resolution)
            words = [("init word", init_word)] + ([("true word", true_word)] if true_word else [])
            for label, word in words:
                full = f"{colour} {word}" if label == "true word" else None  # the true word names the colour too
                scores = score_subject(generator, oracle, word, shape, colour, samples=args.samples,
                                       seed=sampling_seed(seed), reconstruction_subject=full)  # fmt: skip
                # bounds of a composition: both words at their initialisers; the true colour and shape words
                pair = f"{COLOUR_CONCEPT[1] if label == 'true word' else COLOUR_CONCEPT[2]} {word}"
                composed = compose(generator, oracle, pair, shape, {}, args.samples, seed) if args.composition else None
                records.append({"concept": name, "variant": label, "seed": seed, **scores.as_dict(),
                                "composition": composed})  # fmt: skip
            for label, overrides in chosen.items():
                engine = trained.get((label, name))
                points = {}  # --trajectory: step -> the vectors the run would save there
                if engine is None:
                    engine = Inversion(model, images, concept_config(base, overrides, init_word, colour, seed), name)
                    for _ in range(engine.config.steps):
                        engine.step()
                        if args.trajectory and engine.step_count % args.trajectory == 0:
                            points[engine.step_count] = engine.current_vectors()
                vectors = engine.learned_vectors()
                scores = score_subject(generator, oracle, f"<{name}>", shape, colour, {name: vectors},
                                       samples=args.samples, seed=sampling_seed(seed))  # fmt: skip
                trajectory = []
                for step, point in points.items():
                    scored = scores if torch.equal(point, vectors) else score_subject(  # the saved point: scored above
                        generator, oracle, f"<{name}>", shape, colour, {name: point}, samples=args.samples,
                        seed=sampling_seed(seed))  # fmt: skip
                    trajectory.append({"step": step, **scored.as_dict()})
                if trajectory:
                    path = " ".join(f"{p['step']}:{p['reconstruction']:.2f}/{p['editability']:.2f}" for p in trajectory)
                    print(f"[{time.time() - started:6.0f}s] {name} seed {seed} trajectory {path}", flush=True)
                if engine.selected:  # the same run without selection: its last point
                    last = score_subject(generator, oracle, f"<{name}>", shape, colour,
                                         {name: engine.current_vectors()}, samples=args.samples,
                                         seed=sampling_seed(seed))  # fmt: skip
                    records.append({"concept": name, "variant": f"{label} (last step)", "seed": seed,
                                    "init_word": engine.config.init_word, "composition": None,
                                    **last.as_dict()})  # fmt: skip
                    print(f"[{time.time() - started:6.0f}s] {name} seed {seed} last step: "
                          f"recon {last.reconstruction:.2f} edit {last.editability:.2f}; "
                          f"selected step {engine.selected.step}", flush=True)  # fmt: skip
                norm = vectors.norm(dim=-1).mean().item() / engine.init_rows.norm(dim=-1).mean().item()
                composed = None
                if args.composition:
                    both = {name: vectors, COLOUR_CONCEPT[0]: colour_vectors[label]}
                    composed = compose(generator, oracle, f"<{COLOUR_CONCEPT[0]}> <{name}>", shape, both, args.samples,
                                       seed)  # fmt: skip
                extra = {"init_search": engine.init_search.as_dict()} if engine.init_search else {}
                extra |= {"trajectory": trajectory} if trajectory else {}
                records.append({"concept": name, "variant": label, "seed": seed, "init_word": engine.config.init_word,
                                "norm_ratio": norm, "final_loss": engine.last_loss, "composition": composed,
                                **scores.as_dict(), **extra})  # fmt: skip
                print(f"[{time.time() - started:6.0f}s] {name} seed {seed} {label:<18} "
                      f"recon {scores.reconstruction:.2f} edit {scores.editability:.2f} "
                      f"shape-kept {scores.edited_shape:.2f} |v|/|init| {norm:.2f}"
                      + (f" composed {composed:.2f}" if composed is not None else ""), flush=True)  # fmt: skip
                record = {"config": base, "world": args.world, "packed": args.packed, "records": records}
                results.write_text(json.dumps(record, indent=2) + "\n")
    trained = [v for v in dict.fromkeys(r["variant"] for r in records) if v not in ("init word", "true word")]
    summarize(records, trained, [c[0] for c in concepts], args.out)
    print(f"\nwrote {args.out}/results.json, table.md, scatter.png in {time.time() - started:.0f}s")


def summarize(records: list[dict], variant_names: list[str], concept_names: list[str], out: Path) -> None:
    """Means over seeds per variant and concept: a printed table, table.md and scatter.png."""
    rows = []
    for variant in ["init word", "true word", *variant_names]:
        for name in [*concept_names, "mean"]:
            picked = [r for r in records if r["variant"] == variant and (name == "mean" or r["concept"] == name)]
            if not picked:
                continue
            row = {"variant": variant, "concept": name}
            for key in ("reconstruction", "editability", "edited_shape"):
                row[key] = statistics.mean(r[key] for r in picked)
            composed = [r["composition"] for r in picked if r.get("composition") is not None]
            row["composition"] = statistics.mean(composed) if composed else None
            rows.append(row)
    width = max(len(row["variant"]) for row in rows) + 2
    print(f"\n{'variant':<{width}}{'concept':<14}{'recon':>7}{'edit':>7}{'shape kept':>12}{'composed':>10}")
    lines = [
        "| variant | concept | reconstruction | editability | edited shape kept | composition |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        composed = f"{row['composition']:.2f}" if row["composition"] is not None else "—"
        print(f"{row['variant']:<{width}}{row['concept']:<14}{row['reconstruction']:>7.2f}{row['editability']:>7.2f}"
              f"{row['edited_shape']:>12.2f}{composed:>10}")  # fmt: skip
        lines.append(f"| {row['variant']} | {row['concept']} | {row['reconstruction']:.2f} | "
                     f"{row['editability']:.2f} | {row['edited_shape']:.2f} | {composed} |")  # fmt: skip
    (out / "table.md").write_text("\n".join(lines) + "\n")
    scatter([r for r in rows if r["concept"] == "mean"], out / "scatter.png")


if __name__ == "__main__":
    main()

"""Choosing the init word from the concept's images (``init_word_search``).

The paper starts the vectors at a coarse word the user names ("dog"). How far they then have to
travel depends on that word, and a class word can be far from a concept the model already has a
better word for: on a second ShapesWorld model the class word "shape" leaves the arrow unlearned
after 600 steps, while the same recipe started from the model's own word for it learns it
(docs/quality.md). The search finds such a word without being told the answer:

- candidates: the class's members from the shipped word list (or ``init_word_candidates``);
- each candidate is scored by the plain diffusion loss of "a photo of a {word}" on the concept's
  own images, the whole word as a caption would write it (several tokens allowed), on the same
  noisy latents and timesteps for every word, so the comparison is paired;
- the lowest-loss candidate replaces ``init_word`` only when it passes two tests:
  - it is *clearly* better than ``init_word``: its per-sample loss differences from
    ``init_word``'s have a mean at least ``MARGIN`` standard errors below zero, so it does not win
    by noise;
  - it is a word the model knows for these images, not a lucky draw: ``CHANCE_WORDS`` random
    embeddings (random directions at the vocabulary's typical norm) are scored the same way, and
    the candidate must beat the best of them by at least ``CHANCE_LEAD`` times as much as that one
    beats the median one. A class word that describes the images poorly ("shape" for an arrow)
    is beaten by some random embeddings, and so is a word the model never learned (in ShapesWorld,
    one its captions never used): the best of many near-random draws, not a description, and a
    poor start (docs/quality.md). On ShapesWorld the model's own words lead the best random
    embedding by 0.65 to 6.8 times its lead over the median one on 40 of 43 named-shape runs; on
    the other three a single random embedding scored far below the other fifteen and the own word
    was refused (``SearchResult.random`` records what the test saw); ranking against the second best
    of them instead admits those words and also words the model never learned, which trained worse
    (docs/quality.md), so the best it stays. A scale-free lead and not a count of standard errors:
    with 320 samples, the best of ten unknown words beats the best of sixteen random ones by up to
    4 standard errors.

Colour and other attribute words are not candidates: they would lower the loss by describing the
images' colour, which is exactly what the word should leave to the prompt.

A concept that no listed word describes (ShapesWorld's arrow, which the captions never name) can
still have a word the model knows for it elsewhere in the vocabulary. ``init_word_vocabulary``
proposes that many more candidates from the tokenizer's whole words: the loss's gradient at
``init_word``, averaged over the same paired samples, says which way the loss falls fastest, and
the words whose embeddings lie furthest that way from ``init_word``'s, to first order
``(e_word - e_init) . grad``, are proposed (as HotFlip and AutoPrompt propose token swaps). One
backward pass and one matrix product rank every word; the proposals then pass the same two tests
as listed words. Colour words are never proposed. The chance test's random embeddings are not
chosen by the gradient as the proposals are, so a word the model never learned can pass it when
it happens to lie the right way (on the SDXL-shaped ShapesWorld's hourglass, docs/quality.md).
So a proposal replaces a listed word that passed only when it also passes both tests against
that word: proposals are for images no listed word describes.

A proposal can still win by the images' colour, which the listed words cannot describe since
colour words are never candidates: on the first ShapesWorld's blue cross, "cabinet" beat "cross"
by more than ``MARGIN`` standard errors on two seeds of ten and, chosen, trained a word that left
less to the prompt's colour. So with ``edit_words`` set, a proposal must also not be clearly worse
(``MARGIN`` standard errors, paired) than the word it would replace on *edited* prompts, "a photo
of a {edit word} {word}" on the same images and samples: a prompt that names another colour takes
away what a word gains by describing the images' colour, and leaves what it gains by describing
the rest. "cabinet" is 21 standard errors worse than "cross" there, the second world's "pdf" 16 to
20 worse than "hourglass"; "long", the first world's word for arrows, is within 1.6 of the member
"crescent" and keeps its plain lead (docs/quality.md). Only the finalists are scored so.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from pipeline.engine.config import InversionConfig, class_references, make_config

if TYPE_CHECKING:
    from pipeline.engine.inversion import Batch, Inversion
    from pipeline.engine.model import BaseModel

SAMPLES_PER_IMAGE = 64  # (noise, timestep) draws per image: 320 paired samples for five images
MARGIN = 3.0  # standard errors by which a candidate must beat init_word
CHANCE_WORDS = 16  # random embeddings that show what a word that means nothing here scores
CHANCE_LEAD = 0.5  # a candidate's lead over the best of them, in units of that one's lead over their median
PROMPT = "a photo of a {}"
# whole words the vocabulary proposal may choose: lower-case letters only, three or more
VOCABULARY_WORD = re.compile(r"[a-z]{3,}")
COLOUR_WORDS = frozenset([
    "red", "orange", "yellow", "green", "blue", "purple", "violet", "pink", "brown", "black", "white", "grey",
    "gray", "cyan", "magenta", "teal", "turquoise", "navy", "maroon", "beige", "gold", "golden", "silver",
    "crimson", "scarlet", "indigo", "lime", "olive", "tan", "ivory", "colour", "color", "colored", "coloured",
    "colorful", "colourful",
])  # fmt: skip


@dataclass(frozen=True)
class SearchResult:
    """What the search compared: each word's mean loss, and the word it chose."""

    chosen: str
    baseline: str
    losses: dict[str, float]
    margins: dict[str, float]  # each candidate's mean advantage over the baseline, in standard errors
    chance: dict[str, float]  # each word's lead over the best random embedding (see CHANCE_LEAD)
    proposed: tuple[str, ...] = ()  # the candidates the vocabulary proposal added
    edited: dict[str, float] = field(default_factory=dict)  # the finalists' mean loss on edited prompts
    random: tuple[float, ...] = ()  # the random embeddings' mean losses, lowest first: what the chance test saw

    @property
    def margin(self) -> float:
        """The chosen word's advantage over the baseline in standard errors (0 for the baseline)."""
        return self.margins.get(self.chosen, 0.0)

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "baseline": self.baseline, "margin": round(self.margin, 2),
                "losses": {w: round(v, 6) for w, v in self.losses.items()},
                "margins": {w: round(v, 2) for w, v in self.margins.items()},
                "chance": {w: round(v, 2) for w, v in self.chance.items()},
                "proposed": list(self.proposed),
                "edited": {w: round(v, 6) for w, v in self.edited.items()},
                "random": [round(v, 6) for v in self.random]}  # fmt: skip


def _pieces(batch: Batch, size: int = 64) -> Iterator[Batch]:
    for part in range(0, len(batch.prompts), size):
        chunk = slice(part, part + size)
        yield replace(batch, latents=batch.latents[chunk], noise=batch.noise[chunk],
                      timesteps=batch.timesteps[chunk], prompts=batch.prompts[chunk])  # fmt: skip


def _losses(engine: Inversion, piece: Batch, rows: torch.Tensor) -> torch.Tensor:
    error = engine.predict(piece, {engine.name: rows}) - engine.target(piece)
    return error.pow(2).flatten(1).mean(1)


@torch.no_grad()
def sample_losses(engine: Inversion, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """Per-sample diffusion loss of ``batch`` (captions ``PROMPT``) with the input embeddings
    ``rows`` ``[tokens, dim]`` in the engine's place: ``[samples]``."""
    rows = rows.to(engine.device)
    return torch.cat([_losses(engine, piece, rows).cpu() for piece in _pieces(batch)])


def edited_losses(engine: Inversion, batch: Batch, word: str, edit_words: Sequence[str]) -> torch.Tensor:
    """Per-sample loss of ``batch``'s images and samples under "a photo of a {edit word} {word}",
    averaged over ``edit_words``: ``[samples]``."""
    rows = engine.model.text_embeddings(word)
    edits = [replace(batch, prompts=[PROMPT.format(f"{edit} {engine.token}")] * len(batch.prompts))
             for edit in edit_words]  # fmt: skip
    return torch.stack([sample_losses(engine, edit, rows) for edit in edits]).mean(0)


def loss_gradient(engine: Inversion, batch: Batch, rows: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean diffusion loss of ``batch`` with respect to ``rows`` ``[tokens, dim]``."""
    rows = rows.detach().to(engine.device).requires_grad_(True)
    for piece in _pieces(batch):
        (_losses(engine, piece, rows).sum() / len(batch.prompts)).backward()
    return rows.grad.detach().cpu()


def vocabulary(model: BaseModel) -> tuple[list[str], torch.Tensor]:
    """The tokenizer's whole words (``VOCABULARY_WORD``, one token in every tokenizer, no colour
    words) and their input embeddings ``[words, dim]``, encoders side by side as in ``text_embeddings``."""
    tokenizers = [model.tokenizer, *([model.tokenizer_2] if model.text_encoder_2 is not None else [])]
    vocabs = [tokenizer.get_vocab() for tokenizer in tokenizers]
    words = [token[:-4] for token in vocabs[0] if token.endswith("</w>") and VOCABULARY_WORD.fullmatch(token[:-4])
             and token[:-4] not in COLOUR_WORDS and all(token in v for v in vocabs[1:])]  # fmt: skip
    tables = [encoder.get_input_embeddings().weight.detach().float() for encoder in model.text_encoders]
    rows = [table[torch.tensor([v[f"{w}</w>"] for w in words])] for table, v in zip(tables, vocabs, strict=True)]
    return words, torch.cat(rows, dim=-1)


def propose_words(engine: Inversion, batch: Batch, init: torch.Tensor, count: int, exclude: set[str]) -> list[str]:
    """The ``count`` words whose embeddings lie furthest from the one-token ``init`` ``[1, dim]`` in
    the direction the loss falls, to first order; none of ``exclude``."""
    gradient = loss_gradient(engine, batch, init)[0]
    words, rows = vocabulary(engine.model)
    order = ((rows - init[0].cpu()) @ gradient).argsort().tolist()
    return [words[i] for i in order if words[i] not in exclude][:count]


def chance_rows(encoders: list[torch.nn.Module], seed: int) -> torch.Tensor:
    """``CHANCE_WORDS`` random one-token embeddings ``[count, 1, dim]``: random directions at the
    median norm of the vocabulary's embeddings, so they differ from words only in meaning nothing.
    With two text encoders (SDXL) each encoder's columns get their own direction and norm."""
    generator, parts = torch.Generator().manual_seed(seed), []
    for encoder in encoders:
        embeddings = encoder.get_input_embeddings().weight.detach().float()
        directions = torch.randn(CHANCE_WORDS, 1, embeddings.shape[-1], generator=generator)
        parts.append(directions / directions.norm(dim=-1, keepdim=True) * embeddings.norm(dim=-1).median())
    return torch.cat(parts, dim=-1)


def search_init_word(engine: Inversion, config: InversionConfig) -> SearchResult:
    """Scores ``init_word`` and every candidate on the engine's images; see the module docstring."""
    # its own draws, the same for every word: the training stream is the same with or without a search
    batch = engine.evaluation_batch(config.seed + 7919, repeats=SAMPLES_PER_IMAGE, template=PROMPT)
    words = [config.init_word, *config.search_candidates()]
    init = engine.model.text_embeddings(config.init_word)
    proposed = []
    if config.init_word_vocabulary and len(init) == 1:  # a swap of one token: what the gradient ranks
        exclude = {w.lower() for w in words} | {(config.class_word or "").lower()}
        proposed = propose_words(engine, batch, init, config.init_word_vocabulary, exclude)
        words += proposed
    scores = {word: sample_losses(engine, batch, engine.model.text_embeddings(word)) for word in words}
    random_rows = chance_rows(engine.model.text_encoders, config.seed)
    random = torch.stack([sample_losses(engine, batch, rows).mean() for rows in random_rows])
    losses = {word: s.mean().item() for word, s in scores.items()}
    best, median = random.min().item(), random.median().item()
    chance = {word: (best - loss) / max(median - best, 1e-12) for word, loss in losses.items()}
    margins = {word: paired_margin(scores[word], scores[config.init_word]) for word in words[1:]}
    edited: dict[str, torch.Tensor] = {}  # scored only for the finalists that choose compares on them

    def edited_scores(word: str) -> torch.Tensor:
        if word not in edited:
            edited[word] = edited_losses(engine, batch, word, config.edit_words)
        return edited[word]

    chosen = choose(scores, chance, config.init_word, proposed, edited_scores if config.edit_words else None)
    edited_means = {word: s.mean().item() for word, s in edited.items()}
    return SearchResult(chosen, config.init_word, losses, margins, chance, tuple(proposed), edited_means,
                        tuple(sorted(random.tolist())))  # fmt: skip


def paired_margin(scores: torch.Tensor, reference: torch.Tensor) -> float:
    """How far the per-sample losses ``scores`` lie below ``reference``'s on the same samples, on
    average, in standard errors of that mean difference."""
    difference = scores - reference
    return -difference.mean().item() / max(difference.std().item() / len(difference) ** 0.5, 1e-12)


def choose(
    scores: dict[str, torch.Tensor],
    chance: dict[str, float],
    baseline: str,
    proposed: Sequence[str],
    edited_scores: Callable[[str], torch.Tensor] | None = None,
) -> str:
    """The word the search chooses from the per-sample losses ``scores`` of ``baseline`` and every
    candidate: among the listed candidates that pass both tests against ``baseline``, the lowest
    mean loss (else ``baseline``); a proposed word replaces that choice only when it passes the same
    tests against it too, so a word from the whole vocabulary never displaces a listed word by noise,
    and, given ``edited_scores`` (a word's per-sample losses on edited prompts), when that word does
    not beat it there by ``MARGIN`` standard errors."""

    def passes(word: str, over: str) -> bool:
        return paired_margin(scores[word], scores[over]) >= MARGIN and chance[word] >= CHANCE_LEAD

    def mean(word: str) -> float:
        return scores[word].mean().item()

    listed = [word for word in scores if word != baseline and word not in proposed]
    chosen = min((word for word in listed if passes(word, baseline)), key=mean, default=baseline)
    better = [word for word in proposed if passes(word, baseline) and passes(word, chosen)]
    if better and edited_scores is not None:  # and is not clearly worse than it on edited prompts
        better = [word for word in better if paired_margin(edited_scores(chosen), edited_scores(word)) < MARGIN]
    return min(better, key=mean, default=chosen)


def with_chosen_word(config: InversionConfig, result: SearchResult, tokens: int) -> InversionConfig:
    """The config the run trains with: the chosen init word, enough vectors for its ``tokens``, the
    chosen word as edit consistency's reference in place of the class's members, a chosen member's
    ``member_average_decay``, and the search off, so that the recorded config reproduces the run as
    it stands."""
    values = config.model_dump()
    values.update(init_word=result.chosen, init_word_search=False, init_word_candidates=[], init_word_vocabulary=0,
                  num_vectors=max(config.num_vectors, tokens))  # fmt: skip
    if result.chosen != result.baseline and config.edit_reference_words == class_references(config.class_word):
        # the chosen word is the best reference the edits have: a word the model knows for these very
        # images; the class's members only stand in for one (given references are kept)
        values["edit_reference_words"] = [result.chosen]
    if result.chosen not in (result.baseline, *result.proposed) and config.member_average_decay is not None:
        values["average_decay"] = config.member_average_decay  # a near start: average longer (see the field)
    return make_config(values, "init_word_search")

"""Typed, validated configuration: the one source of defaults for an inversion run.

Every consumer (the CLI, Ray Train jobs, benchmarks) builds an ``InversionConfig``; pydantic
rejects a bad value with a message that names the field, before any work starts.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.errors import InputError

Precision = Literal["auto", "fp32", "bf16", "fp16"]
TemplateSet = Literal["object", "style"]
# a known attribute is written into captions, so it is plain text: no '{}' slots, no '<name>' tokens
ATTRIBUTE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9 '-]{0,39}")


class ConfigError(InputError):
    """A configuration that cannot be used; the message names the source and the field."""


REFERENCE_MEMBERS = 4  # a class's first members serve as edit consistency's reference words


@cache
def class_members() -> dict[str, list[str]]:
    """The shipped per-class word lists (``pipeline/assets/class-words.yaml``): for a class word,
    common members of the class that prompts already control. The first ``REFERENCE_MEMBERS`` are
    edit consistency's references; all of them are ``init_word_search``'s candidates."""
    text = resources.files("pipeline").joinpath("assets", "class-words.yaml").read_text()
    return {str(k): [str(w) for w in v] for k, v in yaml.safe_load(text).items()}


def class_references(class_word: str | None) -> list[str]:
    """Edit consistency's reference words for a class: its first ``REFERENCE_MEMBERS`` members."""
    return class_members().get((class_word or "").lower(), [])[:REFERENCE_MEMBERS]


class InversionConfig(BaseModel):
    """Hyper-parameters of one textual-inversion run (defaults follow the paper and diffusers' example)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    recipe: str | None = Field(
        None, description="the recipe these settings started from (a shipped name or a file; recorded with the result)"
    )
    class_word: str | None = Field(
        None,
        description="the concept's kind, e.g. 'dog': the init word defaults to it, and with edit_consistency "
        "and no edit_reference_words the references are the class's members from the shipped word list "
        "(or the class word itself when the class is not listed)",
    )
    steps: int = Field(3000, ge=1, le=1_000_000, description="optimiser steps")
    learning_rate: float = Field(5e-3, gt=0, le=10.0, description="base learning rate")
    scale_lr: bool = Field(
        False, description="multiply the learning rate by batch_size x grad_accum (the paper's scaling)"
    )
    batch_size: int = Field(1, ge=1, le=256, description="images per micro-batch")
    grad_accum: int = Field(1, ge=1, le=256, description="micro-batches per optimiser step")
    num_vectors: int = Field(1, ge=1, le=75, description="vectors the pseudo-word starts with")
    progressive_steps: list[int] = Field(
        default_factory=list,
        description="steps at which one more vector is appended (progressive extension), e.g. [2000, 4000]",
    )
    regularization_weight: float = Field(
        0.0,
        ge=0.0,
        description="weight of the pull toward the initialiser: mean ||v - v_init||^2 / ||v_init||^2",
    )
    average_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="keep an exponential moving average of the vectors with this decay (e.g. 0.95) and "
        "save it instead of the last iterate; 0: off",
    )
    member_average_decay: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="average_decay instead, when init_word_search chooses one of the class's listed words: a word "
        "the model already draws these images with, so the vectors need not travel far, and a longer average keeps "
        "the images' colour out of the word (docs/quality.md); unset: average_decay whatever the search chose",
    )
    selection_interval: int = Field(
        0,
        ge=0,
        description="every this many steps, and at the last, score the vectors that would be saved by the "
        "diffusion loss on one fixed batch of the concept's own images, and save the lowest-scoring instead of "
        "the last (pipeline/engine/selection.py); 0: off",
    )
    selection_samples: int = Field(
        64, ge=1, le=1024, description="(noise, timestep) draws per image in selection_interval's fixed batch"
    )
    per_image_tokens: bool = Field(False, description="learn an extra token per training image as well")
    per_image_mix_prob: float = Field(
        0.25, ge=0.0, le=1.0, description="probability that a caption also names the image's own token"
    )
    known_attributes: list[str] = Field(
        default_factory=list,
        description="words that describe every training image but are not the concept (its colour, say), "
        "e.g. ['blue']: a share of captions name them before the word ('a photo of a blue <x>'), so the word "
        "need not carry them and prompts can change them",
    )
    known_attribute_share: float = Field(
        0.5, ge=0.0, le=1.0, description="share of captions that name the known attributes"
    )
    known_attribute_pull: float = Field(
        0.0,
        ge=0.0,
        description="weight of an extra pull toward the initialiser along the known attributes' own embeddings: "
        "mean ||P(v - v_init)||^2 / ||v_init||^2, P the projection on their span, so the word moves freely "
        "except toward them; 0: off",
    )
    edit_words: list[str] = Field(
        default_factory=list,
        description="words a prompt should still be able to apply to the word (other colours, say), e.g. "
        "['green', 'purple']: used by edit_consistency, and by init_word_search to check a proposed word on "
        "prompts that name them",
    )
    edit_reference_words: list[str] = Field(
        default_factory=list,
        description="words of the concept's kind whose response to the edit words the word's should match, "
        "e.g. ['circle', 'square']: one of them stands in the word's place for each caption; empty: the "
        "initialiser word",
    )
    edit_consistency: float = Field(
        0.0,
        ge=0.0,
        description="weight of the edit-consistency loss: an edit word placed before the word ('a green <x>') "
        "should change the UNet's prediction as it does for the initialiser word (or edit_reference_words), on the "
        "same noisy latents; costs about 3x the compute per step; 0: off",
    )
    templates: TemplateSet | list[str] = Field(
        "object", description="'object', 'style', or a custom list of captions with one '{}'"
    )
    resolution: int | None = Field(
        None, ge=8, le=4096, description="training resolution in pixels (default: the model's)"
    )
    min_image_side: int | None = Field(
        None, ge=1, le=16384, description="smallest accepted image side (default: the resolution)"
    )
    flip_prob: float = Field(0.5, ge=0.0, le=1.0, description="probability of a horizontal flip")
    init_word: str = Field(
        "object",
        min_length=1,
        description="the word the vectors start from (default: the class word); a word of several tokens "
        "starts that many vectors, so num_vectors must be at least its token count",
    )
    init_word_search: bool = Field(
        False,
        description="choose the init word by the concept's images: among init_word and the candidates "
        "(init_word_candidates, else the class's members from the shipped word list), the word whose "
        "prompt 'a photo of a {word}' denoises the images clearly better than init_word's, if any. The "
        "chosen word is recorded as init_word (num_vectors raised to its token count) with the search off",
    )
    init_word_candidates: list[str] = Field(
        default_factory=list,
        description="words init_word_search chooses among, besides init_word (default: the class's "
        "members from the shipped word list), e.g. ['poodle', 'terrier']",
    )
    init_word_vocabulary: int = Field(
        0,
        ge=0,
        le=64,
        description="init_word_search also scores this many words proposed from the tokenizer's whole "
        "vocabulary: those the loss's gradient at init_word points to most (colour words excluded), for "
        "concepts no listed word describes; 0: only the listed candidates",
    )
    seed: int = Field(0, ge=0, le=2**63 - 1, description="seed of every random draw (images, captions, noise)")
    precision: Precision = Field("auto", description="auto: bf16 on GPUs that support it, else fp32")
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay on the new vectors")
    compile_unet: bool = Field(
        False,
        description="run the UNet through torch.compile (inductor): faster steps after a one-off compilation "
        "(about a minute on 2 CPU cores, seconds from torch's cache)",
    )
    checkpoint_interval: int = Field(100, ge=1, description="steps between full-state checkpoints")
    log_interval: int = Field(10, ge=1, description="steps between loss-log records")
    validation_prompts: list[str] = Field(
        default_factory=list, description="prompts rendered to a grid during training; use <NAME>"
    )
    validation_interval: int = Field(500, ge=1, description="steps between validation grids")
    validation_steps: int = Field(25, ge=1, le=1000, description="denoising steps of validation images")

    @model_validator(mode="before")
    @classmethod
    def _no_proposals_without_the_search(cls, data: Any) -> Any:
        """``init_word_vocabulary`` is part of the search: a recipe may set it and ``--no-init-word-search``
        still turns the whole search off (and the recorded config says 0)."""
        if isinstance(data, dict) and not data.get("init_word_search") and data.get("init_word_vocabulary"):
            data = {**data, "init_word_vocabulary": 0}
        return data

    @model_validator(mode="before")
    @classmethod
    def _derive_from_class_word(cls, data: Any) -> Any:
        """What the class word implies, where not given: the init word, and edit consistency's
        reference words (its class's members from the shipped list; none, so the initialiser
        word, when the class is not listed)."""
        if not isinstance(data, dict) or not isinstance(data.get("class_word"), str):
            return data
        data = dict(data)
        data.setdefault("init_word", data["class_word"])
        if data.get("edit_consistency") and not data.get("edit_reference_words"):
            data["edit_reference_words"] = class_references(data["class_word"])
        return data

    @field_validator("templates", mode="before")
    @classmethod
    def _set_name_in_a_list(cls, templates: Any) -> Any:
        """``--templates style`` arrives from the command line as ``['style']``: a set's name, not a
        custom caption (those need a '{}')."""
        if isinstance(templates, list) and len(templates) == 1 and templates[0] in ("object", "style"):
            return templates[0]
        return templates

    @field_validator("progressive_steps")
    @classmethod
    def _increasing_positive(cls, steps: list[int]) -> list[int]:
        if any(s < 1 for s in steps):
            raise ValueError("every progressive step must be >= 1")
        if steps != sorted(set(steps)):
            raise ValueError("progressive steps must be strictly increasing")
        return steps

    @field_validator("templates")
    @classmethod
    def _one_slot_each(cls, templates: str | list[str]) -> str | list[str]:
        if isinstance(templates, list):
            if not templates:
                raise ValueError("a custom template list must not be empty")
            for t in templates:
                if t.count("{}") != 1:
                    raise ValueError(f"template {t!r} must contain '{{}}' exactly once")
        return templates

    @field_validator("known_attributes", "edit_words", "edit_reference_words", "init_word_candidates")
    @classmethod
    def _plain_words(cls, words: list[str], info: ValidationInfo) -> list[str]:
        what = info.field_name.replace("_", " ").removesuffix("s")  # 'known attribute', 'edit word', ..
        limit = 32 if info.field_name == "init_word_candidates" else 8
        if len(words) > limit:
            raise ValueError(f"at most {limit} {what}s, got {len(words)}")
        for word in words:
            if info.field_name == "init_word_candidates" and len(word.split()) != 1:
                raise ValueError(f"init word candidate {word!r} must be a single word: it may become init_word")
            if not ATTRIBUTE_PATTERN.fullmatch(word):
                raise ValueError(f"{what} {word!r} must be 1-40 letters, digits, spaces, hyphens or apostrophes")
        return words

    @field_validator("init_word", "class_word")
    @classmethod
    def _one_word(cls, word: str | None, info: ValidationInfo) -> str | None:
        if word is not None and (len(word.split()) != 1 or not ATTRIBUTE_PATTERN.fullmatch(word)):
            raise ValueError(f"{info.field_name} must be a single word of letters, digits or hyphens, got {word!r}")
        return word

    @model_validator(mode="after")
    def _vector_budget(self) -> InversionConfig:
        total = self.num_vectors + len(self.progressive_steps)
        if total > 75:
            raise ValueError(f"num_vectors + len(progressive_steps) = {total} exceeds 75 (CLIP's 77 tokens)")
        if self.progressive_steps and self.progressive_steps[-1] >= self.steps:
            raise ValueError(
                f"progressive step {self.progressive_steps[-1]} is not before the last step ({self.steps})"
            )
        return self

    @model_validator(mode="after")
    def _pull_has_attributes(self) -> InversionConfig:
        if self.known_attribute_pull and not self.known_attributes:
            raise ValueError("known_attribute_pull needs known_attributes: the words whose directions it pulls along")
        return self

    @model_validator(mode="after")
    def _consistency_has_words(self) -> InversionConfig:
        if self.edit_consistency and not self.edit_words:
            raise ValueError("edit_consistency needs edit_words: the words whose effect on the word it keeps")
        if self.edit_reference_words and not self.edit_consistency:
            raise ValueError("edit_reference_words needs edit_consistency: the loss that uses them")
        return self

    @model_validator(mode="after")
    def _search_has_candidates(self) -> InversionConfig:
        if self.init_word_candidates and not self.init_word_search:
            raise ValueError("init_word_candidates needs init_word_search: the search that chooses among them")
        if self.init_word_search and not (self.init_word_candidates or self.search_candidates()):
            raise ValueError(
                "init_word_search needs candidates: give the concept's class_word (one listed in "
                "pipeline/assets/class-words.yaml, e.g. shape or dog), or init_word_candidates, or turn "
                "init_word_search off"
            )
        return self

    def search_candidates(self) -> list[str]:
        """The words ``init_word_search`` compares with ``init_word``: the given candidates, else the
        class's members; never ``init_word`` itself, each once."""
        words = self.init_word_candidates or class_members().get((self.class_word or "").lower(), [])
        return [w for w in dict.fromkeys(words) if w.lower() != self.init_word.lower()]

    @property
    def effective_learning_rate(self) -> float:
        """The learning rate the optimiser uses (scaled by batch size x accumulation when asked)."""
        if self.scale_lr:
            return self.learning_rate * self.batch_size * self.grad_accum
        return self.learning_rate

    @property
    def total_vectors(self) -> int:
        return self.num_vectors + len(self.progressive_steps)


def describe_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem, each naming the field, e.g. ``jobs.yaml: steps: Input should be ...``."""
    lines = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "(top level)"
        lines.append(f"{source}: {field}: {problem['msg']}")
    return "\n".join(lines)


def make_config(values: dict[str, Any], source: str = "config") -> InversionConfig:
    """Builds a config, turning pydantic's error into a ``ConfigError`` that names source and field."""
    try:
        return InversionConfig(**values)
    except ValidationError as err:
        raise ConfigError(describe_validation_error(err, source)) from None

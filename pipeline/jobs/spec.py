"""The bulk-job manifest: many concepts, one base model, shared defaults, where results go.

    job: pets-2026-11                    # the job's id: runs, checkpoints and idempotency key on it
    base_model: shapesworld              # folder, hub id, s3://... or a bundled name
    registry: s3://concepts/prod         # where results are published
    checkpoint_storage: s3://ckpt/oneword
    recipe: sd15-object                  # a shipped recipe or a YAML file; per concept too
    defaults: {steps: 2000, learning_rate: 5.0e-3}   # InversionConfig fields, over the recipe
    resources: {gpu: 0.25, cpu: 1}       # per concept (per pack when pack_size > 1)
    pack_size: 1                         # concepts trained together in one step on one model
    max_failures: 2                      # restarts per concept (pack) after a worker dies
    max_concurrent: 8                    # concepts (packs) running at once
    storage_patience: 600                # seconds a job waits out an unreachable object store
    concepts:
      - {name: my-dog, images: s3://photos/dog/, class_word: dog}
      - {name: my-style, images: ./styles/a, init_word: painting, recipe: sd15-style, overrides: {steps: 3000}}

A concept's training config is its recipe (the concept's, else the job's), then ``defaults``,
then the concept's own fields, then its ``overrides``, each overriding the one before.

Errors name the file, the line and the field (``jobs.yaml:14: concepts.1.init_word: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from pipeline.engine.concepts import validate_name
from pipeline.engine.config import ConfigError, InversionConfig
from pipeline.engine.recipes import load_recipe
from pipeline.store.job_records import JOB_ID_RE, JOB_ID_RULE


class Resources(BaseModel):
    """What one Ray Train worker asks for: one concept's, or one pack's when ``pack_size`` > 1."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    gpu: float = Field(0.0, ge=0, le=8, description="GPUs per concept (per pack): 1, 0.5, 0.25 ...; 0 = CPU only")
    cpu: float = Field(1.0, gt=0, le=64, description="CPUs per concept (per pack)")

    @field_validator("gpu")
    @classmethod
    def _whole_or_fraction(cls, gpu: float) -> float:
        if gpu > 1 and gpu != int(gpu):
            raise ValueError("more than one GPU must be a whole number")
        return gpu


class ConceptSpec(BaseModel):
    """One concept to learn."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    images: str = Field(min_length=1, description="s3://bucket/prefix or a folder of images")
    recipe: str | None = Field(None, description="a shipped recipe or a YAML file (default: the job's)")
    class_word: str | None = Field(None, description="the concept's kind, e.g. dog (see InversionConfig)")
    init_word: str | None = Field(
        None, description="the word the vectors start from (default: the class word; see InversionConfig)"
    )
    templates: Literal["object", "style"] | list[str] | None = None
    overrides: dict[str, Any] = Field(default_factory=dict, description="InversionConfig fields for this concept")

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        return validate_name(name)


class JobSpec(BaseModel):
    """A whole bulk job (see the module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    job: str = Field(description=f"job id: {JOB_ID_RULE}")
    base_model: str
    registry: str
    checkpoint_storage: str
    concepts: list[ConceptSpec] = Field(min_length=1)
    recipe: str | None = Field(None, description="the recipe every concept starts from, unless it names its own")
    defaults: dict[str, Any] = Field(default_factory=dict)
    resources: Resources = Resources()
    checkpoint_interval: int | None = Field(
        None, ge=1, description="steps between checkpoints; a shortcut for defaults.checkpoint_interval"
    )
    pack_size: int = Field(
        1,
        ge=1,
        le=256,
        description="concepts trained together in each step on one loaded model (1: each concept its own run); "
        "a pack's slots refill from its queue as concepts finish",
    )
    max_failures: int = Field(2, ge=0, le=100, description="restarts of a concept's (pack's) run after its worker dies")
    max_concurrent: int = Field(4, ge=1, le=10_000, description="concepts (packs, when pack_size > 1) running at once")
    keep_checkpoints: int = Field(2, ge=1, le=100)
    storage_patience: float = Field(600.0, ge=0, le=86_400, description="seconds to wait out an object-store outage")
    previews: bool = Field(
        True,
        description="render each trained concept's preview image (its first validation prompt, "
        "validation_steps denoising steps) and keep it with the version in the registry",
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="the job's log lines: text, or JSON lines with the job id, concept and fields in each"
    )

    @field_validator("job")
    @classmethod
    def _valid_job(cls, job: str) -> str:
        if not JOB_ID_RE.fullmatch(job):
            raise ValueError(f"invalid job id {job!r}: use {JOB_ID_RULE}")
        return job

    @model_validator(mode="after")
    def _unique_names_and_valid_configs(self, info: ValidationInfo) -> JobSpec:
        if not (info.context or {}).get("defer_cross_checks"):
            problems = self.cross_check()
            if problems:
                raise ValueError("; ".join(f"{'.'.join(map(str, loc))}: {msg}" for loc, msg in problems))
        return self

    def cross_check(self) -> list[tuple[tuple[Any, ...], str]]:
        """Problems that span fields: repeated names, and each concept's merged training config
        (defaults + overrides) must validate now, not later on a worker. ``(location, message)``."""
        problems: list[tuple[tuple[Any, ...], str]] = []
        # defaults the job would replace without a word: refused, naming what wins instead
        if "recipe" in self.defaults:
            problems.append((("defaults", "recipe"), "recipes are chosen before defaults apply: set the job's "
                             "`recipe:` (or a concept's), not defaults.recipe"))  # fmt: skip
        interval = self.defaults.get("checkpoint_interval")
        if self.checkpoint_interval is not None and interval is not None and interval != self.checkpoint_interval:
            problems.append((("defaults", "checkpoint_interval"), f"{interval} would be replaced by the job's "
                             f"checkpoint_interval: {self.checkpoint_interval}; set one of them"))  # fmt: skip
        seen: set[str] = set()
        for index, concept in enumerate(self.concepts):
            if concept.name in seen:
                problems.append((("concepts", index, "name"), f"concept {concept.name!r} appears twice"))
            seen.add(concept.name)
            try:
                self.config_for(concept)
            except ConfigError as err:  # a recipe that is not there or has a bad field
                where = ("concepts", index, "recipe") if concept.recipe else ("recipe",)
                problems.append((where, str(err)))
            except ValidationError as err:
                for e in err.errors():
                    field = str(e["loc"][0]) if e["loc"] else ""
                    if field in concept.overrides:
                        loc: tuple[Any, ...] = ("concepts", index, "overrides", field)
                    elif field in self.defaults:
                        loc = ("defaults", field)
                    else:
                        loc = ("concepts", index, field)
                    message = e["msg"] if loc[0] == "defaults" else f"{e['msg']} (concept {concept.name!r})"
                    if (loc, message) not in problems:
                        problems.append((loc, message))
        return problems

    def config_for(self, concept: ConceptSpec) -> InversionConfig:
        """The concept's training config: recipe, defaults, the concept's fields, its overrides."""
        recipe = concept.overrides.get("recipe") or concept.recipe or self.recipe
        own = {"class_word": concept.class_word, "init_word": concept.init_word, "templates": concept.templates,
               "checkpoint_interval": self.checkpoint_interval}  # fmt: skip
        values = {**(load_recipe(recipe) if recipe else {}), **self.defaults,
                  **{k: v for k, v in own.items() if v is not None}, **concept.overrides}  # fmt: skip
        return InversionConfig(**values)

    def run_name(self, concept: str) -> str:
        """The Ray Train run name: deterministic per job and concept, so a resubmit resumes."""
        return f"{self.job}--{concept}"


def _line_of(node: yaml.Node | None, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at a pydantic error location, as deep as it exists."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next((v for k, v in node.value if getattr(k, "value", None) == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            match = node.value[part]
        else:
            match = None
        if match is None:
            break
        node, line = match, match.start_mark.line + 1
    return line


def parse_job_spec(text: str, source: str = "job manifest") -> JobSpec:
    """Validates a manifest given as YAML or JSON text; errors name source, line and field."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: ~10x faster on a 2,000-concept manifest
    try:
        data = yaml.load(text, Loader=loader)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML/JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with job, base_model, registry, concepts, ...")
    try:
        spec = JobSpec.model_validate(data, context={"defer_cross_checks": True})
        problems = spec.cross_check()
    except ValidationError as err:
        problems = [(tuple(e["loc"]), e["msg"].removeprefix("Value error, ")) for e in err.errors()]
    if problems:
        root = yaml.compose(text, Loader=loader)  # the node tree only to say where the problems are
        lines = []
        for loc, message in problems:
            line = _line_of(root, loc)
            field = ".".join(str(p) for p in loc) or "(top level)"
            lines.append(f"{source}:{line}: {field}: {message}" if line else f"{source}: {field}: {message}")
        raise ConfigError("\n".join(lines))
    return spec


def load_job_spec(path: Path) -> JobSpec:
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the job manifest ({err.strerror})") from None
    return parse_job_spec(text, str(path))

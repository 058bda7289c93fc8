"""Concept names and references in prompts: ``<name>`` / ``<name@version>``, and the naming rule.

Light on purpose (no torch): job manifests, the registry and the CLI's bookkeeping commands
check names with it. ``pipeline.engine.prompt_encoder`` places the vectors.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import InputError

NAME_PATTERN = r"[a-z0-9_-]{1,64}"
NAME_RULE = "1-64 characters from lowercase letters a-z, digits 0-9, '-' and '_'"
_NAME_RE = re.compile(NAME_PATTERN)
# A reference: <name> or <name@version>. Versions use the same safe alphabet plus '.'.
_REFERENCE_RE = re.compile(rf"<({NAME_PATTERN})(?:@([A-Za-z0-9._-]{{1,64}}))?>")


class PromptError(InputError):
    """A prompt that cannot be encoded (too long, or naming a concept that was not supplied)."""


class InvalidNameError(InputError):
    """A concept name that breaks the naming rule."""


class UnknownConceptError(PromptError):
    def __init__(self, reference: str, known: Sequence[str]):
        self.reference = reference
        hint = f"; known: {', '.join(sorted(known))}" if known else ""
        super().__init__(f"prompt references <{reference}> but no vectors were given for it{hint}")


class PromptTooLongError(PromptError):
    def __init__(self, prompt: str, tokens: int, limit: int):
        self.tokens, self.limit = tokens, limit
        super().__init__(f"prompt needs {tokens} tokens after concept expansion, the limit is {limit}: {prompt[:80]!r}")


def validate_name(name: str) -> str:
    """Returns ``name`` if it is a valid concept name, else raises with the rule."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidNameError(f"invalid concept name {name!r}: use {NAME_RULE}")
    return name


def placeholder(name: str) -> str:
    """The text users write in prompts for a concept."""
    return f"<{validate_name(name)}>"


@dataclass(frozen=True)
class ConceptRef:
    """One ``<name[@version]>`` in a prompt. ``key`` is what the vector mapping is indexed by."""

    name: str
    version: str | None

    @property
    def key(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def parse_prompt(prompt: str) -> list[str | ConceptRef]:
    """Splits a prompt into plain-text segments and concept references, in order."""
    parts: list[str | ConceptRef] = []
    position = 0
    for match in _REFERENCE_RE.finditer(prompt):
        if match.start() > position:
            parts.append(prompt[position : match.start()])
        parts.append(ConceptRef(match.group(1), match.group(2)))
        position = match.end()
    if position < len(prompt):
        parts.append(prompt[position:])
    return parts


def concept_refs(prompt: str) -> list[ConceptRef]:
    """The distinct concept references of a prompt, in first-use order."""
    seen: dict[str, ConceptRef] = {}
    for part in parse_prompt(prompt):
        if isinstance(part, ConceptRef):
            seen.setdefault(part.key, part)
    return list(seen.values())

"""Concept vectors in prompts: parse ``<name>`` / ``<name@version>`` and place vectors per batch.

Design principle 2: a concept is data, not model surgery. The tokenizer and the embedding
matrix are never changed. A prompt is split around its concept references, the plain text is
tokenized as usual, each reference becomes as many *slots* as the concept has vectors, and the
text encoder runs on input embeddings in which the slots hold the concept's vectors. Two prompts
in one batch may use different concepts; nothing shared is mutated, so it is thread-safe.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

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


@dataclass(frozen=True)
class TokenizedPrompt:
    """Token ids padded to the model length, and which positions take which concept's vector rows."""

    input_ids: tuple[int, ...]
    slots: tuple[tuple[int, str, int], ...]  # (position, concept key, vector row)


class PromptEncoder:
    """Turns prompts plus a mapping ``key -> tensor[n, dim]`` into text-encoder hidden states."""

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length: int = tokenizer.model_max_length
        # Slots get a neutral id before their embedding is replaced; it must not be EOS, which
        # CLIP's pooled output searches for.
        self._slot_id: int = tokenizer.bos_token_id
        self._transformer = getattr(text_encoder, "text_model", text_encoder)

    def tokenize(self, prompt: str, counts: Mapping[str, int]) -> TokenizedPrompt:
        """Tokenizes one prompt; ``counts`` gives each known concept's number of vectors."""
        refs = concept_refs(prompt)
        for ref in refs:
            if ref.key not in counts:
                raise UnknownConceptError(ref.key, list(counts))
        return self._tokenize_cached(prompt, tuple((r.key, counts[r.key]) for r in refs))

    @lru_cache(maxsize=4096)  # noqa: B019 - one encoder per model; training repeats a few dozen captions
    def _tokenize_cached(self, prompt: str, refs: tuple[tuple[str, int], ...]) -> TokenizedPrompt:
        counts = dict(refs)
        ids = [self.tokenizer.bos_token_id]
        slots: list[tuple[int, str, int]] = []
        for part in parse_prompt(prompt):
            if isinstance(part, ConceptRef):
                for row in range(counts[part.key]):
                    slots.append((len(ids), part.key, row))
                    ids.append(self._slot_id)
            else:
                ids.extend(self.tokenizer(part, add_special_tokens=False).input_ids)
        ids.append(self.tokenizer.eos_token_id)
        if len(ids) > self.max_length:
            raise PromptTooLongError(prompt, len(ids), self.max_length)
        ids.extend([self.tokenizer.pad_token_id] * (self.max_length - len(ids)))
        return TokenizedPrompt(tuple(ids), tuple(slots))

    def encode(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states ``[len(prompts), max_length, dim]``; gradients flow into ``vectors``."""
        counts = {key: value.shape[0] for key, value in vectors.items()}
        tokenized = [self.tokenize(p, counts) for p in prompts]
        embedding = self._transformer.embeddings.token_embedding
        device = embedding.weight.device
        input_ids = torch.tensor([t.input_ids for t in tokenized], device=device)
        with torch.no_grad():
            embeds = embedding(input_ids)
        slots = [(b, pos, key, row) for b, t in enumerate(tokenized) for pos, key, row in t.slots]
        if slots:
            batch_index = torch.tensor([s[0] for s in slots], device=device)
            positions = torch.tensor([s[1] for s in slots], device=device)
            values = torch.stack([vectors[key][row] for _, _, key, row in slots]).to(embeds.dtype)
            embeds = embeds.index_put((batch_index, positions), values)
        return self.encode_embeddings(embeds)

    def encode_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Runs CLIP's text transformer (positions, causal self-attention, final norm) on embeddings."""
        transformer = self._transformer
        hidden = transformer.embeddings(inputs_embeds=inputs_embeds)
        length = hidden.shape[1]
        causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device)
        causal = causal.triu(1).to(hidden.dtype)[None, None]
        hidden = transformer.encoder(inputs_embeds=hidden, attention_mask=causal).last_hidden_state
        return transformer.final_layer_norm(hidden)

"""Concept vectors in prompts: encode prompts whose ``<name>`` references take given vectors.

Design principle 2: a concept is data, not model surgery. The tokenizer and the embedding
matrix are never changed. A prompt is split around its concept references, the plain text is
tokenized as usual, each reference becomes as many *slots* as the concept has vectors, and the
text encoder runs on input embeddings in which the slots hold the concept's vectors. Two prompts
in one batch may use different concepts; nothing shared is mutated, so it is thread-safe.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch

from pipeline.engine.concepts import ConceptRef, PromptTooLongError, UnknownConceptError, concept_refs, parse_prompt


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

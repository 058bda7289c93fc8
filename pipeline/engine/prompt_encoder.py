"""Concept vectors in prompts: encode prompts whose ``<name>`` references take given vectors.

Design principle 2: a concept is data, not model surgery. The tokenizer and the embedding
matrix are never changed. A prompt is split around its concept references, the plain text is
tokenized as usual, each reference becomes as many *slots* as the concept has vectors, and the
text encoder runs on input embeddings in which the slots hold the concept's vectors. Two prompts
in one batch may use different concepts; nothing shared is mutated, so it is thread-safe.

SDXL has two text encoders of different widths. A concept is then one set of rows per encoder,
stored side by side as ``[n, width_1 + width_2]``; each encoder gets its own columns. What the
UNet is conditioned on follows diffusers' ``StableDiffusionXLPipeline.encode_prompt``: both
encoders' penultimate hidden states (no final norm) concatenated, plus the second encoder's
pooled, projected output at the end-of-text token. SD 1.x/2.x use the last layer, final norm.
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


@dataclass
class Conditioning:
    """What the UNet is conditioned on: hidden states ``[B, 77, width]`` and, for SDXL, the second
    encoder's pooled output ``[B, projection]`` (the UNet's ``text_embeds``)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None

    def unet_kwargs(self, height: int, width: int, dtype: torch.dtype) -> dict:
        """Keyword arguments of the UNet's forward for images of ``height`` x ``width`` pixels. SDXL's
        size conditioning says: original size = target size = the image's, no crop."""
        kwargs: dict = {"encoder_hidden_states": self.hidden.to(dtype)}
        if self.pooled is not None:
            time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=dtype, device=self.hidden.device)
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled.to(dtype),
                                           "time_ids": time_ids.repeat(self.hidden.shape[0], 1)}  # fmt: skip
        return kwargs


class PromptEncoder:
    """Turns prompts plus a mapping ``key -> tensor[n, dim]`` into text-encoder hidden states
    (and, with a second encoder, SDXL's pooled output)."""

    def __init__(self, tokenizer, text_encoder, tokenizer_2=None, text_encoder_2=None):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizers = [tokenizer] + ([tokenizer_2] if text_encoder_2 is not None else [])
        self.encoders = [text_encoder] + ([text_encoder_2] if text_encoder_2 is not None else [])
        self.widths = [int(e.config.hidden_size) for e in self.encoders]
        self.max_length: int = tokenizer.model_max_length
        # Slots get a neutral id before their embedding is replaced; it must not be EOS, which
        # CLIP's pooled output searches for.
        self._slot_id: int = tokenizer.bos_token_id
        self._transformer = getattr(text_encoder, "text_model", text_encoder)

    @property
    def sdxl(self) -> bool:
        return len(self.encoders) == 2

    def tokenize(self, prompt: str, counts: Mapping[str, int], index: int = 0) -> TokenizedPrompt:
        """Tokenizes one prompt for encoder ``index``; ``counts`` gives each known concept's number
        of vectors."""
        refs = concept_refs(prompt)
        for ref in refs:
            if ref.key not in counts:
                raise UnknownConceptError(ref.key, list(counts))
        return self._tokenize_cached(prompt, tuple((r.key, counts[r.key]) for r in refs), index)

    @lru_cache(maxsize=4096)  # noqa: B019 - one encoder per model; training repeats a few dozen captions
    def _tokenize_cached(self, prompt: str, refs: tuple[tuple[str, int], ...], index: int = 0) -> TokenizedPrompt:
        tokenizer = self.tokenizers[index]
        counts = dict(refs)
        ids = [tokenizer.bos_token_id]
        slots: list[tuple[int, str, int]] = []
        for part in parse_prompt(prompt):
            if isinstance(part, ConceptRef):
                for row in range(counts[part.key]):
                    slots.append((len(ids), part.key, row))
                    ids.append(self._slot_id)
            else:
                ids.extend(tokenizer(part, add_special_tokens=False).input_ids)
        ids.append(tokenizer.eos_token_id)
        if len(ids) > self.max_length:
            raise PromptTooLongError(prompt, len(ids), self.max_length)
        ids.extend([tokenizer.pad_token_id] * (self.max_length - len(ids)))  # SDXL's second pads with "!"
        return TokenizedPrompt(tuple(ids), tuple(slots))

    def encode(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Hidden states ``[len(prompts), max_length, dim]``; gradients flow into ``vectors``."""
        return self.condition(prompts, vectors).hidden

    def condition(self, prompts: Sequence[str], vectors: Mapping[str, torch.Tensor]) -> Conditioning:
        """Everything the UNet is conditioned on for these prompts; gradients flow into ``vectors``."""
        counts = {key: value.shape[0] for key, value in vectors.items()}
        hidden, pooled, start = [], None, 0
        for index, width in enumerate(self.widths):
            columns = {key: value[:, start : start + width] for key, value in vectors.items()}
            start += width
            tokenized = [self.tokenize(p, counts, index) for p in prompts]
            embeds = self._input_embeddings(index, tokenized, columns)
            if not self.sdxl:
                return Conditioning(self.encode_embeddings(embeds))
            states, last = self._penultimate_and_last(index, embeds)
            hidden.append(states)
            if index == 1:  # the pooled output: the end-of-text token's state, projected
                eos = self.tokenizers[index].eos_token_id
                positions = torch.tensor([t.input_ids.index(eos) for t in tokenized], device=last.device)
                pooled = self.encoders[index].text_projection(last[torch.arange(len(prompts)), positions])
        return Conditioning(torch.cat(hidden, dim=-1), pooled)

    def _input_embeddings(self, index: int, tokenized: list[TokenizedPrompt],
                          columns: Mapping[str, torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """The token embeddings of the prompts, with every slot holding its concept's row."""
        transformer = getattr(self.encoders[index], "text_model", self.encoders[index])
        embedding = transformer.embeddings.token_embedding
        device = embedding.weight.device
        input_ids = torch.tensor([t.input_ids for t in tokenized], device=device)
        with torch.no_grad():
            embeds = embedding(input_ids)
        slots = [(b, pos, key, row) for b, t in enumerate(tokenized) for pos, key, row in t.slots]
        if slots:
            batch_index = torch.tensor([s[0] for s in slots], device=device)
            positions = torch.tensor([s[1] for s in slots], device=device)
            values = torch.stack([columns[key][row] for _, _, key, row in slots]).to(embeds.dtype)
            embeds = embeds.index_put((batch_index, positions), values)
        return embeds

    def encode_embeddings(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Runs CLIP's text transformer (positions, causal self-attention, final norm) on embeddings."""
        transformer = self._transformer
        hidden = transformer.embeddings(inputs_embeds=inputs_embeds)
        hidden = transformer.encoder(inputs_embeds=hidden, attention_mask=_causal_mask(hidden)).last_hidden_state
        return transformer.final_layer_norm(hidden)

    def _penultimate_and_last(self, index: int, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SDXL's view of encoder ``index``: the penultimate layer's states (no final norm), and the
        last layer's after the final norm (where the pooled output comes from)."""
        transformer = getattr(self.encoders[index], "text_model", self.encoders[index])
        hidden = transformer.embeddings(inputs_embeds=inputs_embeds)
        causal = _causal_mask(hidden)
        *early, final = transformer.encoder.layers
        for layer in early:
            hidden = layer(hidden, causal)
        return hidden, transformer.final_layer_norm(final(hidden, causal))


def _causal_mask(hidden: torch.Tensor) -> torch.Tensor:
    length = hidden.shape[1]
    causal = torch.full((length, length), torch.finfo(hidden.dtype).min, device=hidden.device)
    return causal.triu(1).to(hidden.dtype)[None, None]

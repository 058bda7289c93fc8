"""Textual inversion: the algorithm, and nothing else (no Ray, no storage, no HTTP).

Learn vectors ``v`` for a new pseudo-word so that the frozen latent diffusion model denoises the
concept's images well when prompted with it:

    loss = || target - unet(z_t, t, text_encoder(caption with v)) ||^2,  z_t = add_noise(z, eps, t)

plus, when configured, the extra terms of ``pipeline.engine.losses`` (pulls toward the initialiser,
edit consistency).

Only the gradient's path is paid for: the VAE latent distribution of every image (and its
mirror image) is computed once; model weights are frozen and get no gradients; the optimiser
holds state for the new vectors only; vectors are placed into the text encoder's input per
batch (no tokenizer or embedding-matrix surgery). All randomness comes from one generator whose
state, with the optimiser's and the sampler's, makes ``state_dict()`` an exact resume point.

    engine = Inversion(model, images, config, name="my-dog")
    for _ in range(config.steps):
        loss = engine.step()
    vectors = engine.learned_vectors()     # [n, dim]
"""

from __future__ import annotations

import copy
import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.engine.concepts import placeholder
from pipeline.engine.config import InversionConfig
from pipeline.engine.data import templates_for, with_image_token
from pipeline.engine.init_words import search_init_word, with_chosen_word
from pipeline.engine.losses import attribute_basis, edit_consistency_from, extra_loss, plan_edit
from pipeline.engine.model import BaseModel
from pipeline.engine.selection import Selected, score_and_keep
from pipeline.errors import InputError

STATE_FORMAT = 1
# Config fields that may change between an interruption and its resume without changing the
# trajectory (the run may be extended, or checkpoint/log more often).
RESUMABLE_CHANGES = {"steps", "checkpoint_interval", "log_interval", "validation_interval",
                     "validation_prompts", "validation_steps"}  # fmt: skip


_COMPILED: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module] = weakref.WeakKeyDictionary()


def compiled(unet: torch.nn.Module) -> torch.nn.Module:
    """The UNet through inductor, with its convolution layout optimisation off.

    With that optimisation on, torch 2.13's inductor returns zero input gradients through a
    resnet followed by an upsampler (diffusers' ``UpBlock2D``), a silent error of about 40% in
    the learned vector's gradient; with it off the gradient matches eager (cosine 0.9999996) at
    nearly the same speed. ``benchmarks/compile_gradient_check.py`` checks both settings.
    """
    if unet not in _COMPILED:  # one compiled UNet per model: a pack refills slots without recompiling
        _COMPILED[unet] = torch.compile(unet, dynamic=False, options={"layout_optimization": False})
    return _COMPILED[unet]


def init_rows(model: BaseModel, config: InversionConfig) -> torch.Tensor:
    """The init word's token embeddings, ``[tokens, dim]``: a word of several tokens ('hour glass')
    starts that many vectors, one from each, so it needs at least as many vectors."""
    rows = model.text_embeddings(config.init_word)
    if not 1 <= len(rows) <= config.num_vectors:
        raise InputError(
            f"init_word {config.init_word!r} is {len(rows)} tokens for this tokenizer but the word starts with "
            f"{config.num_vectors} vector(s): set num_vectors to at least {len(rows)}, or choose another word"
        )
    return rows


class DivergedError(InputError):
    """A concept's loss stopped being a finite number (usually: the learning rate is too high)."""


@dataclass
class Batch:
    """One micro-batch: clean latents, the noise and timesteps to apply, and the captions."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    prompts: list[str]


class Inversion:
    """One concept's inversion run. ``step()`` is one optimiser step; see the module docstring."""

    def __init__(self, model: BaseModel, images: torch.Tensor, config: InversionConfig, name: str):
        self.model, self.config, self.name = model, config, name
        self.device = model.device
        self.token = placeholder(name)
        self.encoder = model.prompt_encoder()
        self.unet = compiled(model.unet) if config.compile_unet else model.unet
        self.templates = templates_for(config.templates)
        self.attribute_basis = (attribute_basis(model, config.known_attributes)
                                if config.known_attribute_pull else None)  # fmt: skip
        self.generator = torch.Generator().manual_seed(config.seed)  # every random draw, on CPU
        self.num_images = images.shape[0]
        self.latent_mean, self.latent_std = self._encode_latent_distributions(images)
        # init_word_search: the run trains (and records) the config with the word it chose
        self.init_search = search_init_word(self, config) if config.init_word_search else None
        if self.init_search:
            tokens = len(model.text_embeddings(self.init_search.chosen))
            self.config = config = with_chosen_word(config, self.init_search, tokens)
        self.init_rows = init_rows(model, config).to(self.device)

        self.vectors = [self._new_vector(i) for i in range(config.num_vectors)]
        # the moving average of the vectors (``average_decay``): what is saved when it is on
        self.averages = [v.detach().clone() for v in self.vectors] if config.average_decay else []
        self.image_vectors = [self._new_vector(0) for _ in range(self.num_images)] if config.per_image_tokens else []
        self.optimizer = torch.optim.AdamW(
            self.vectors + self.image_vectors, lr=config.effective_learning_rate, weight_decay=config.weight_decay
        )
        self.step_count = 0
        self.last_loss = float("nan")
        # selection_interval: the best-scoring point so far, and the fixed batch it is scored on
        self.selected: Selected | None = None
        self.selection_batch: Batch | None = None
        self._order = torch.empty(0, dtype=torch.long)  # current epoch's image order
        self._cursor = 0

    # --- setup ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode_latent_distributions(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of the VAE posterior of each image and of its mirror: ``[2, n, c, h, w]``."""
        vae = self.model.vae
        means, stds = [], []
        for flipped in (False, True):
            pixels = images.flip(-1) if flipped else images
            parts = [vae.encode(chunk.to(self.device, self.model.dtype)).latent_dist for chunk in pixels.split(8)]
            means.append(torch.cat([p.mean for p in parts]).float())
            stds.append(torch.cat([p.std for p in parts]).float())
        return torch.stack(means), torch.stack(stds)

    def initial_vectors(self, count: int) -> torch.Tensor:
        """Where ``count`` vectors start: the init word's token embeddings in turn, ``[count, dim]``."""
        return self.init_rows[torch.arange(count) % len(self.init_rows)]

    def _new_vector(self, index: int) -> torch.nn.Parameter:
        return torch.nn.Parameter(self.init_rows[index % len(self.init_rows)].clone())

    def _maybe_extend(self) -> None:
        """Progressive extension: append one vector (from the initialiser) at each scheduled step."""
        if self.step_count in self.config.progressive_steps:
            vector = self._new_vector(len(self.vectors))
            self.vectors.append(vector)
            self.optimizer.add_param_group({"params": [vector]})
            if self.config.average_decay:
                self.averages.append(vector.detach().clone())

    # --- the step ---------------------------------------------------------------------------------

    def _next_indices(self, count: int) -> torch.Tensor:
        """Image indices in epochs: each image once per shuffled pass (the sampler's state)."""
        chosen = []
        for _ in range(count):
            if self._cursor >= len(self._order):
                self._order = torch.randperm(self.num_images, generator=self.generator)
                self._cursor = 0
            chosen.append(self._order[self._cursor])
            self._cursor += 1
        return torch.stack(chosen)

    def sample_batch(self) -> Batch:
        """Draws one micro-batch: images, flips, captions, latent samples, noise and timesteps."""
        size, g = self.config.batch_size, self.generator
        index = self._next_indices(size)
        flip = (torch.rand(size, generator=g) < self.config.flip_prob).long()
        template = torch.randint(len(self.templates), (size,), generator=g)
        with_image = torch.rand(size, generator=g) < self.config.per_image_mix_prob
        # drawn only when captions name attributes, so that runs without them keep their trajectories
        attributes = " ".join(self.config.known_attributes) if self.config.known_attribute_share else ""
        named = torch.rand(size, generator=g) < self.config.known_attribute_share if attributes else None
        shape = (size, *self.latent_mean.shape[2:])
        latent_eps = torch.randn(shape, generator=g)
        noise = torch.randn(shape, generator=g)
        timesteps = torch.randint(self.model.noise_scheduler.config.num_train_timesteps, (size,), generator=g)

        prompts = []
        for i in range(size):
            caption = self.templates[template[i]]
            if named is not None and named[i]:
                caption = caption.replace("{}", f"{attributes} {{}}", 1)  # 'a photo of a blue {}'
            if self.image_vectors and with_image[i]:
                prompts.append(with_image_token(caption).format(self.token, f"<{self.name}@image{int(index[i])}>"))
            else:
                prompts.append(caption.format(self.token))
        mean, std = self.latent_mean[flip, index], self.latent_std[flip, index]
        latents = self._scale_latents(mean + std * latent_eps.to(self.device))
        return Batch(latents, noise.to(self.device), timesteps.to(self.device), prompts)

    def _scale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        vae_config = self.model.vae.config
        shift = getattr(vae_config, "shift_factor", None) or 0.0
        return (latents - shift) * vae_config.scaling_factor

    def vector_table(self, vectors: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        table = {self.name: torch.stack(self.vectors) if vectors is None else vectors}
        for i, vector in enumerate(self.image_vectors):
            table[f"{self.name}@image{i}"] = vector[None]
        return table

    def predict(self, batch: Batch, vectors: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The UNet's prediction for the batch's noisy latents under its captions (with the learned
        vectors, or with the given table of concept vectors)."""
        return predict_packed(self, [(batch, self.vector_table() if vectors is None else vectors)])[0]

    def target(self, batch: Batch) -> torch.Tensor:
        """What the UNet should predict: the noise, or the velocity for v-prediction models."""
        if self.model.prediction_type == "v_prediction":
            return self.model.noise_scheduler.get_velocity(batch.latents, batch.noise, batch.timesteps).float()
        return batch.noise.float()

    def diffusion_loss(self, batch: Batch, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """The latent-diffusion objective on one batch (with the learned or the given vectors)."""
        return F.mse_loss(self.predict(batch, None if vectors is None else self.vector_table(vectors)),
                          self.target(batch))  # fmt: skip

    def step(self) -> float:
        """One optimiser step over ``grad_accum`` micro-batches; returns the mean diffusion loss.
        A pack of one: ``packed_step`` is the only step there is."""
        return packed_step([self])[0]

    # --- results and evaluation -------------------------------------------------------------------

    def current_vectors(self) -> torch.Tensor:
        """The vectors as they stand, ``[n, dim]`` float32 on CPU (per-image tokens excluded): their
        moving average when ``average_decay`` is on, else the last iterate."""
        return torch.stack(self.averages or self.vectors).detach().float().cpu()

    def learned_vectors(self) -> torch.Tensor:
        """What the run saves, ``[n, dim]``: the best-scoring point so far when ``selection_interval``
        is on (``pipeline.engine.selection``), else ``current_vectors()``."""
        return self.selected.vectors.clone() if self.selected else self.current_vectors()

    def evaluation_batch(self, seed: int, repeats: int = 4, template: str = "a photo of a {}") -> Batch:
        """Fixed (noise, timestep) pairs over every image: the same batch for any vectors."""
        g = torch.Generator().manual_seed(seed)
        count = self.num_images * repeats
        index = torch.arange(self.num_images).repeat(repeats)
        shape = (count, *self.latent_mean.shape[2:])
        latents = self._scale_latents(
            self.latent_mean[0, index] + self.latent_std[0, index] * torch.randn(shape, generator=g).to(self.device)
        )
        noise = torch.randn(shape, generator=g).to(self.device)
        timesteps = torch.randint(self.model.noise_scheduler.config.num_train_timesteps, (count,), generator=g)
        return Batch(latents, noise, timesteps.to(self.device), [template.format(self.token)] * count)

    @torch.no_grad()
    def evaluate(self, batch: Batch, vectors: torch.Tensor | None = None) -> float:
        """Diffusion loss on a fixed batch, in chunks so that any batch size fits."""
        losses = []
        for start in range(0, len(batch.prompts), 16):
            part = slice(start, start + 16)
            chunk = Batch(batch.latents[part], batch.noise[part], batch.timesteps[part], batch.prompts[part])
            used = None if vectors is None else vectors.to(self.device)
            losses.append(self.diffusion_loss(chunk, used).item() * len(chunk.prompts))
        return sum(losses) / len(batch.prompts)

    # --- exact resume -----------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue bit-identically (tensors and plain values only)."""
        return {
            "format": STATE_FORMAT,
            "name": self.name,
            "identity": self.model.identity,
            "config": self.config.model_dump(mode="json"),
            "step": self.step_count,
            "last_loss": self.last_loss,
            "vectors": [v.detach().cpu().clone() for v in self.vectors],
            "averages": [v.detach().cpu().clone() for v in self.averages],
            "image_vectors": [v.detach().cpu().clone() for v in self.image_vectors],
            "selected": self.selected.state() if self.selected else None,
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),  # a snapshot, not the live moments
            "rng": self.generator.get_state(),
            "order": self._order.clone(),
            "cursor": self._cursor,
        }

    @staticmethod
    def learned_vectors_of(state: dict[str, Any]) -> torch.Tensor:
        """``learned_vectors()`` of a saved ``state_dict()``, without a model."""
        if state.get("selected"):
            return state["selected"]["vectors"].float().clone()
        return torch.stack(state.get("averages") or state["vectors"]).float()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a ``state_dict()``; refuses one from another concept, model or trajectory."""
        if state.get("format") != STATE_FORMAT:
            raise InputError(f"unsupported checkpoint format {state.get('format')!r} (expected {STATE_FORMAT})")
        if state["name"] != self.name:
            raise InputError(f"checkpoint is for concept {state['name']!r}, not {self.name!r}")
        if state["identity"] != self.model.identity:
            raise InputError(f"checkpoint was made on base model {state['identity']}, not {self.model.identity}")
        ours = self.config.model_dump(mode="json")
        changed = sorted(k for k, v in state["config"].items() if k not in RESUMABLE_CHANGES and ours.get(k) != v)
        if changed:
            raise InputError(f"checkpoint's config differs in {', '.join(changed)}; resume with the same settings")

        def params(tensors: list[torch.Tensor]) -> list[torch.nn.Parameter]:
            return [torch.nn.Parameter(t.to(self.device, torch.float32).clone()) for t in tensors]

        self.vectors, self.image_vectors = params(state["vectors"]), params(state["image_vectors"])
        averages = state.get("averages") or ([v.detach() for v in self.vectors] if self.config.average_decay else [])
        self.averages = [t.to(self.device, torch.float32).clone() for t in averages]
        initial = self.config.num_vectors
        self.optimizer = torch.optim.AdamW(
            self.vectors[:initial] + self.image_vectors,
            lr=self.config.effective_learning_rate,
            weight_decay=self.config.weight_decay,
        )
        for vector in self.vectors[initial:]:
            self.optimizer.add_param_group({"params": [vector]})
        # a copy: torch's optimiser adopts same-device tensors as they are and would step them in place
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.step_count = int(state["step"])
        self.last_loss = float(state["last_loss"])
        self.selected = Selected.from_state(state.get("selected"))
        self.generator.set_state(state["rng"])
        self._order, self._cursor = state["order"].clone(), int(state["cursor"])


# --- the step -------------------------------------------------------------------------------------


Part = tuple[Batch, Mapping[str, torch.Tensor]]  # a batch and the concept vectors its captions use


def predict_packed(first: Inversion, parts: Sequence[Part]) -> list[torch.Tensor]:
    """``Inversion.predict`` of several batches (of any engines of ``first``'s model) in one
    text-encoder and one UNet call: rows are independent in both, so each part's rows are what they
    would be alone."""
    if not parts:
        return []
    table: dict[str, torch.Tensor] = {}
    for _, vectors in parts:
        for key, value in vectors.items():
            if table.setdefault(key, value) is not value:
                raise ValueError(f"two parts of one packed call give vectors for {key!r}")
    prompts = [p for batch, _ in parts for p in batch.prompts]
    joined = Batch(torch.cat([b.latents for b, _ in parts]), torch.cat([b.noise for b, _ in parts]),
                   torch.cat([b.timesteps for b, _ in parts]), prompts)  # fmt: skip
    conditioning = first.encoder.condition(joined.prompts, table)
    noisy = first.model.noise_scheduler.add_noise(joined.latents, joined.noise, joined.timesteps)
    model = first.model
    height, width = (side * model.vae_scale_factor for side in joined.latents.shape[-2:])
    out = first.unet(noisy.to(model.dtype), joined.timesteps,
                     **conditioning.unet_kwargs(height, width, model.dtype)).sample.float()  # fmt: skip
    return list(out.split([len(b.prompts) for b, _ in parts]))


def packed_step(engines: Sequence[Inversion]) -> list[float]:
    """One optimiser step of every engine, all of their micro-batches in shared forward passes.

    Each engine's loss is its own diffusion loss (plus its extra terms), so the summed objective
    gives every engine exactly the gradient it would get alone from the same samples; each has its
    own random stream, optimiser, learning rate and step count. An engine whose objective is not a
    finite number is left out of the backward pass and not stepped: its loss is returned (non-finite)
    for the caller to retire it, and the others' gradients never see it.
    """
    if len({e.name for e in engines}) != len(engines) or len({id(e.model) for e in engines}) != 1:
        raise ValueError("a pack's engines share one model and have distinct names")
    for engine in engines:
        engine._maybe_extend()
        engine.optimizer.zero_grad(set_to_none=True)
    totals = [0.0] * len(engines)
    finite = [True] * len(engines)
    for micro in range(max(e.config.grad_accum for e in engines)):
        active = [i for i, e in enumerate(engines) if micro < e.config.grad_accum and finite[i]]
        if not active:
            break
        batches = {i: engines[i].sample_batch() for i in active}
        plans = {i: plan_edit(engines[i], batches[i]) for i in active if engines[i].config.edit_consistency}
        tables = {i: engines[i].vector_table() for i in active}
        # with gradients: every batch and every edited batch; without: the edit references
        outputs = predict_packed(engines[0], [(batches[i], tables[i]) for i in active]
                                 + [(plans[i].edited, tables[i]) for i in plans])  # fmt: skip
        predictions = dict(zip(active, outputs[: len(active)], strict=True))
        edited = dict(zip(plans, outputs[len(active) :], strict=True))
        with torch.no_grad():
            references = predict_packed(
                engines[0],
                [(plan.reference_edited, plan.reference_vectors) for plan in plans.values()]
                + [(plan.reference_plain, plan.reference_vectors) for plan in plans.values()],
            )
        reference_edited = dict(zip(plans, references[: len(plans)], strict=True))
        reference_plain = dict(zip(plans, references[len(plans) :], strict=True))

        objective: torch.Tensor | float = 0.0
        for i in active:
            engine = engines[i]
            loss = F.mse_loss(predictions[i], engine.target(batches[i]))
            edit = (edit_consistency_from(predictions[i], edited[i], reference_edited[i], reference_plain[i])
                    if i in plans else None)  # fmt: skip
            own = (loss + extra_loss(engine, edit)) / engine.config.grad_accum
            totals[i] += loss.item() / engine.config.grad_accum
            if not math.isfinite(own.item()):
                finite[i], totals[i] = False, own.item()  # nan or inf: the caller retires the engine
                continue
            objective = objective + own
        if isinstance(objective, torch.Tensor):
            objective.backward()

    for i, engine in enumerate(engines):
        engine.last_loss = totals[i]
        if not finite[i]:
            continue
        engine.optimizer.step()
        with torch.no_grad():
            for average, vector in zip(engine.averages, engine.vectors, strict=False):
                average.lerp_(vector, 1.0 - engine.config.average_decay)
        engine.step_count += 1
        score_and_keep(engine)
    return totals

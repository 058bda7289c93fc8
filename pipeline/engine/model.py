"""Base-model loading: one path for real SD 1.x/2.x weights and for the offline tiny model.

``load_base_model`` reads a diffusers-layout folder (or a hub id through the normal cache) and
returns the frozen components the inversion needs, plus facts derived once: the prediction type
(SD 2.x uses v-prediction), the native resolution, and an identity of the text encoder so that
vectors learned on one model are refused by another.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from pipeline.engine.prompt_encoder import PromptEncoder
from pipeline.errors import InputError

CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77


class ModelLoadError(InputError):
    """The base model could not be found or is not a Stable-Diffusion-shaped diffusers model."""


# --- the standard CLIP tokenizer, rebuilt offline -------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible byte -> printable-character table."""
    printable = list(range(ord("!"), ord("~") + 1))
    printable += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _clip_bpe_file() -> Path:
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the CLIP BPE vocabulary is missing: `pip install --no-deps clip-anytorch==2.6.0` (setup.sh does)"
        )
    path = Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise ModelLoadError(f"CLIP BPE vocabulary not found at {path}")
    return path


def write_clip_tokenizer(out_dir: Path, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Writes CLIP's 49,408-token vocabulary (vocab.json, merges.txt) and returns the tokenizer.

    Rebuilt as CLIP does it: 256 byte symbols, the same with ``</w>``, one entry per merge
    (lines 1..48894 of the BPE file), then the start and end tokens.
    """
    with gzip.open(_clip_bpe_file(), "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == CLIP_VOCAB_SIZE, len(vocab)
    tokenizer = CLIPTokenizer(
        vocab={token: i for i, token in enumerate(vocab)},
        merges=merges,
        pad_token=pad_token,  # SDXL's second tokenizer pads with "!" (id 0), as OpenCLIP did
        model_max_length=CLIP_MAX_LENGTH,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out_dir)
    return tokenizer


# --- the offline tiny model -----------------------------------------------------------------------

# Widths are SD-1.5's scaled down: text encoder 768 -> 128 (1/6, full 49,408-token vocabulary),
# UNet 320/640 -> 32/64 (1/10), VAE 128..512 -> 16..64 (1/8, two ResNet layers per block as in SD,
# so the one-off VAE encode costs about what it costs SD relative to a denoising step).
TINY_TEXT_CONFIG = dict(
    vocab_size=CLIP_VOCAB_SIZE, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
    num_attention_heads=4, max_position_embeddings=CLIP_MAX_LENGTH, hidden_act="quick_gelu",
    bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)  # fmt: skip
TINY_UNET_CONFIG = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=128, attention_head_dim=8, norm_num_groups=16,
)  # fmt: skip
TINY_VAE_CONFIG = dict(
    sample_size=64, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(16, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=16,
)  # fmt: skip
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    clip_sample=False, set_alpha_to_one=False, steps_offset=1,
)  # fmt: skip


# SDXL's shape at toy size: a second, wider text encoder with a projection (768/1280 -> 128/192),
# cross-attention over both encoders' states side by side, and the UNet's size and pooled-text
# conditioning (addition_time_embed_dim 256 -> 8; 6 size numbers + the projection go in).
TINY_TEXT_CONFIG_2 = dict(TINY_TEXT_CONFIG, hidden_size=192, intermediate_size=768, hidden_act="gelu",
                          projection_dim=192)  # fmt: skip
TINY_XL_UNET_CONFIG = dict(
    TINY_UNET_CONFIG, cross_attention_dim=128 + 192, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 192,
)  # fmt: skip
ARCHITECTURES = ("sd", "sdxl")


def build_tiny_model(out_dir: Path, seed: int = 0, prediction_type: str = "epsilon", arch: str = "sd") -> Path:
    """Builds a small, randomly initialised SD-1.x-shaped (or SDXL-shaped) pipeline in diffusers
    layout (~35 MB).

    Real architecture classes and the real CLIP tokenizer at toy sizes: every code path that
    touches a real model runs against it offline, in seconds.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    if arch not in ARCHITECTURES:
        raise InputError(f"architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = write_clip_tokenizer(out_dir / "tokenizer")
    if arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=AutoencoderKL(**TINY_VAE_CONFIG),
            text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_CONFIG_2)),
            tokenizer=tokenizer,
            tokenizer_2=write_clip_tokenizer(out_dir / "tokenizer_2", pad_token="!"),
            unet=UNet2DConditionModel(**TINY_XL_UNET_CONFIG),
            scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type),
            add_watermarker=False,
        )
        pipe.save_pretrained(out_dir)
        return out_dir
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE_CONFIG),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TINY_TEXT_CONFIG)),
        tokenizer=tokenizer,
        unet=UNet2DConditionModel(**TINY_UNET_CONFIG),
        scheduler=DDIMScheduler(**SD_SCHEDULER_CONFIG, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    return out_dir


# --- loading --------------------------------------------------------------------------------------


@dataclass
class BaseModel:
    """Frozen components of a Stable-Diffusion-shaped model and the facts derived from them."""

    source: str
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    scheduler_config: dict = field(repr=False)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second text encoder and its tokenizer
    text_encoder_2: CLIPTextModelWithProjection | None = None
    force_zeros_for_empty_prompt: bool = False  # SDXL: an empty negative prompt conditions on zeros

    @property
    def architecture(self) -> str:
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def text_encoders(self) -> list[CLIPTextModel]:
        return [self.text_encoder] + ([self.text_encoder_2] if self.text_encoder_2 is not None else [])

    @property
    def embedding_dims(self) -> tuple[int, ...]:
        """Each text encoder's input width; a concept's rows hold them side by side."""
        return tuple(int(encoder.config.hidden_size) for encoder in self.text_encoders)

    @property
    def concept_widths(self) -> tuple[int, ...] | None:
        """``LearnedConcept.widths`` of concepts learned on this model (None: one text encoder)."""
        return widths_of(self.identity)

    def prompt_encoder(self) -> PromptEncoder:
        return PromptEncoder(self.tokenizer, self.text_encoder, self.tokenizer_2, self.text_encoder_2)

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """The native image side: the UNet's latent size times the VAE's downsampling."""
        return resolution_from_configs(self.unet.config, self.vae.config)

    @property
    def embedding_dim(self) -> int:
        """The width of a concept's rows: every text encoder's input width, summed."""
        return sum(self.embedding_dims)

    @property
    def identity(self) -> str:
        return "+".join(text_encoder_identity(encoder) for encoder in self.text_encoders)

    def token_embedding(self, word: str) -> torch.Tensor:
        """The input embedding of a word that must be a single token (fp32 copy)."""
        rows = self.text_embeddings(word)
        if len(rows) != 1:
            raise InputError(f"{word!r} is {len(rows)} tokens for this tokenizer, not one")
        return rows[0]

    def text_embeddings(self, text: str) -> torch.Tensor:
        """The input embeddings of every token of ``text``, ``[tokens, dim]`` (fp32 copy)."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        rows = [self.text_encoder.get_input_embeddings().weight[ids]]
        if self.text_encoder_2 is not None:  # the same words in the second encoder's space, side by side
            ids_2 = self.tokenizer_2(text, add_special_tokens=False).input_ids
            if len(ids_2) != len(ids):
                raise InputError(f"{text!r} is {len(ids)} tokens for the first tokenizer, {len(ids_2)} for the second")
            rows.append(self.text_encoder_2.get_input_embeddings().weight[ids_2])
        return torch.cat([r.detach().float() for r in rows], dim=-1).clone()


def widths_of(identity: str) -> tuple[int, ...] | None:
    """``LearnedConcept.widths`` from a base-model identity: an SDXL one joins its two text encoders'
    (``clip-49408x768-...+clip-49408x1280-...``); None for one encoder."""
    matches = [re.fullmatch(r"clip-\d+x(\d+)-[0-9a-f]+", part) for part in identity.split("+")]
    if len(matches) < 2 or not all(matches):  # one encoder, or not an identity oneword wrote
        return None
    return tuple(int(match.group(1)) for match in matches)


def text_encoder_identity(text_encoder: torch.nn.Module) -> str:
    """A fingerprint of the text encoder's input space: shape plus a hash of the embedding matrix.

    Vectors are only meaningful in the embedding space they were learned in; two models with the
    same identity share it. Cached per module, hashed once (about 0.1 s for SD's 49408x768).
    """
    cached = getattr(text_encoder, "_oneword_identity", None)
    if cached is None:
        weight = text_encoder.get_input_embeddings().weight.detach().to("cpu", torch.float32).contiguous()
        digest = hashlib.sha256(weight.numpy().tobytes()).hexdigest()[:16]
        cached = f"clip-{weight.shape[0]}x{weight.shape[1]}-{digest}"
        text_encoder._oneword_identity = cached
    return cached


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """Maps a precision setting to the frozen weights' dtype; 'auto' means bf16 where supported."""
    if precision == "fp32":
        return torch.float32
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=4)
def _scheduler_config(source: str) -> dict:
    return dict(DDPMScheduler.load_config(source, subfolder="scheduler"))


# Models that ship inside the package, usable by name as --base-model.
BUNDLED_MODELS = {
    "shapesworld": ("assets", "shapesworld", "model"),
    "shapesworld-xl": ("assets", "shapesworld-xl", "model"),  # the same world, SDXL-shaped
}


def resolve_model_source(source: str | Path) -> str:
    """A bundled model's name becomes its folder inside the package; anything else is unchanged.
    ``s3://`` locations are resolved to a local folder above the engine, by
    ``pipeline.store.model_cache.local_model_source``."""
    if str(source) in BUNDLED_MODELS:
        return str(resources.files("pipeline").joinpath(*BUNDLED_MODELS[str(source)]))
    if str(source).startswith("s3://"):
        raise ModelLoadError(f"{source}: fetch s3:// models with pipeline.store.model_cache.local_model_source first")
    return str(source)


def resolution_from_configs(unet_config: dict, vae_config: dict) -> int:
    """The native image side from the UNet's and the VAE's configs: latent size x VAE downsampling."""
    return int(unet_config["sample_size"]) * 2 ** (len(vae_config["block_out_channels"]) - 1)


def native_resolution(source: str | Path) -> int:
    """A local or hub model's native image side from its configs alone (no weights loaded)."""
    source = resolve_model_source(source)
    try:
        unet = UNet2DConditionModel.load_config(source, subfolder="unet")
        vae = AutoencoderKL.load_config(source, subfolder="vae")
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot read the configs of base model {source!r}: {err}") from None
    return resolution_from_configs(unet, vae)


def load_base_model(
    source: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> BaseModel:
    """Loads tokenizer, text encoder, VAE, UNet and the training noise schedule, all frozen.

    ``source`` is a diffusers-layout folder, a hub id (resolved through the normal cache), or the
    name of a bundled model ("shapesworld", "shapesworld-xl").
    Weights get ``requires_grad=False`` and eval mode;
    attention uses PyTorch SDPA.
    """
    source = resolve_model_source(source)
    device = torch.device(device) if device is not None else default_device()
    if Path(source).exists() and not (Path(source) / "model_index.json").is_file():
        raise ModelLoadError(f"{source}: not a diffusers model folder (no model_index.json)")
    second: dict = {}
    try:
        index = _model_index(source)
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        text_encoder = CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", torch_dtype=dtype, attn_implementation="sdpa"
        )
        if index.get("text_encoder_2", [None])[-1] is not None:  # SDXL: the architecture comes from the model
            second["tokenizer_2"] = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer_2")
            second["text_encoder_2"] = CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", torch_dtype=dtype, attn_implementation="sdpa"
            )
            second["force_zeros_for_empty_prompt"] = bool(index.get("force_zeros_for_empty_prompt", True))
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype)
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet", torch_dtype=dtype)
        scheduler_config = _scheduler_config(source)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load base model {source!r}: {err}") from None
    for tok in (tokenizer, second.get("tokenizer_2")):
        if tok is not None:
            tok.model_max_length = min(tok.model_max_length, CLIP_MAX_LENGTH)
    for module in (text_encoder, second.get("text_encoder_2"), vae, unet):
        if module is not None:
            module.requires_grad_(False)
            module.eval()
            module.to(device)
    return BaseModel(
        source=source,
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        device=device,
        dtype=dtype,
        **second,
    )


@lru_cache(maxsize=4)
def _model_index(source: str) -> dict:
    """The pipeline's ``model_index.json``: which components it has (SDXL: a second text encoder)."""
    from diffusers import DiffusionPipeline

    return dict(DiffusionPipeline.load_config(source))

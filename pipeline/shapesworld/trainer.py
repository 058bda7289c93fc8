"""Training ShapesWorld's text-to-image model and its oracle (reproducible, seeded, CPU-sized).

    python -m pipeline.shapesworld.trainer OUT_DIR        # ~50 minutes on 2 cores
    python -m pipeline.shapesworld.trainer OUT_DIR --reuse pipeline/assets/shapesworld
                                                        # UNet + text encoder only, ~32 minutes
    python -m pipeline.shapesworld.trainer OUT_DIR --reuse pipeline/assets/shapesworld --arch sdxl
                                                        # the SDXL-shaped world, ~50 minutes

writes OUT_DIR/model (a diffusers ``StableDiffusionPipeline`` folder, or with ``--arch sdxl`` a
``StableDiffusionXLPipeline`` one, fp16 weights) and
OUT_DIR/oracle.safetensors, plus a training log. The package ships the result in
``pipeline/assets/shapesworld``; see its MODEL_CARD.md for how it was trained and how well it
follows prompts.

Stages, each a plain loop: (1) an AutoencoderKL 32x32 -> 8x8x4; (2) the UNet and a 2-layer CLIP
text encoder trained jointly on the latents with 10% caption dropout (classifier-free guidance);
(3) the oracle, a small CNN reading shape (or "none") and colour off an image.

The SDXL-shaped world has SDXL's conditioning at toy size: two text encoders (widths 64 and 96,
the second with a projection; three layers each, so that the penultimate layer SDXL reads is two
deep), the UNet cross-attending over both encoders' penultimate states side by side, and the
second encoder's pooled projection plus the size ids going in through ``text_time``. Dropped
captions condition on zeros, which is what ``force_zeros_for_empty_prompt`` makes the pipeline
use for classifier-free guidance.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from pipeline.shapesworld.oracle import Oracle, load_oracle, to_tensor
from pipeline.shapesworld.world import COLOURS, SHAPES, SIZE, UNNAMED_SHAPES, draw_shape, random_sample

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

VAE_CONFIG = dict(
    sample_size=SIZE, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=32,
)  # fmt: skip
UNET_CONFIG = dict(
    sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128, 128),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=4, norm_num_groups=32,
)  # fmt: skip
TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
)  # fmt: skip
XL_TEXT_CONFIG = dict(TEXT_CONFIG, num_hidden_layers=3)
XL_TEXT_CONFIG_2 = dict(XL_TEXT_CONFIG, hidden_size=96, intermediate_size=384, hidden_act="gelu", projection_dim=96)
XL_UNET_CONFIG = dict(
    UNET_CONFIG, cross_attention_dim=64 + 96, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=6 * 8 + 96,
)  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_dataset(
    count: int, seed: int, unnamed: tuple[str, ...] = UNNAMED_SHAPES
) -> tuple[torch.Tensor, list[str], list[str], list[str]]:
    """``count`` random world images with their shapes, colours and captions."""
    rng = random.Random(seed)
    samples = [random_sample(rng, unnamed) for _ in range(count)]
    images = to_tensor([draw_shape(s.shape, s.colour, rng) for s in samples])
    return images, [s.shape for s in samples], [s.colour for s in samples], [s.caption for s in samples]


# --- the oracle -----------------------------------------------------------------------------------


def malformed_image(rng: random.Random) -> torch.Tensor:
    """A 'none of these' example: a random blob, a fragment, or two shapes merged."""
    colour = rng.choice(list(COLOURS))
    kind = rng.random()
    if kind < 0.4:  # a random polygon blob on the world's background
        noise = np.random.default_rng(rng.getrandbits(32)).integers(8, 48, (SIZE, SIZE, 3), dtype=np.uint8)
        image = Image.fromarray(noise, "RGB")
        cx, cy, r = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 11)
        points = [(cx + r * rng.uniform(0.3, 1.3) * np.cos(a), cy + r * rng.uniform(0.3, 1.3) * np.sin(a))
                  for a in sorted(rng.uniform(0, 2 * np.pi) for _ in range(rng.randint(5, 9)))]  # fmt: skip
        ImageDraw.Draw(image).polygon(points, fill=COLOURS[colour])
        return to_tensor([image])[0]
    first = to_tensor([draw_shape(rng.choice(SHAPES), colour, rng)])[0]
    if kind < 0.7:  # two shapes merged
        second = to_tensor([draw_shape(rng.choice(SHAPES), colour, rng)])[0]
        return torch.maximum(first, second)
    # a fragment: a random half of the shape blanked out
    out = first.clone()
    if rng.random() < 0.5:
        out[:, :, rng.randint(12, 20) :] = -0.8
    else:
        out[:, rng.randint(12, 20) :, :] = -0.8
    return out


def train_oracle(steps: int, seed: int, vae=None) -> tuple[Oracle, dict]:
    """Trains the oracle on clean images, VAE reconstructions (if given) and malformed shapes."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    oracle = Oracle()
    optimizer = torch.optim.AdamW(oracle.parameters(), lr=2e-3, weight_decay=1e-4)
    colours = list(COLOURS)
    for step in range(steps):
        samples = [random_sample(rng) for _ in range(96)]
        images = to_tensor([draw_shape(s.shape, s.colour, rng) for s in samples])
        if vae is not None and step % 2 == 1:
            with torch.no_grad():
                images = vae(images).sample.clamp(-1, 1)
        shapes = torch.tensor([SHAPES.index(s.shape) for s in samples])
        colour_ids = torch.tensor([colours.index(s.colour) for s in samples])
        blobs = torch.stack([malformed_image(rng) for _ in range(16)])
        shape_logits, colour_logits = oracle(torch.cat([images, blobs]))
        loss = F.cross_entropy(shape_logits, torch.cat([shapes, torch.full((16,), len(SHAPES))]))
        loss = loss + F.cross_entropy(colour_logits[:96], colour_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 200 == 0:
            log(f"oracle step {step}/{steps} loss {loss.item():.4f}")
    oracle.eval()
    return oracle, evaluate_oracle(oracle, seed + 1, vae)


def evaluate_oracle(oracle: Oracle, seed: int, vae=None, count: int = 2000) -> dict:
    images, shapes, colours, _ = make_dataset(count, seed)
    rng = random.Random(seed)
    result = {}
    variants = {"clean": images}
    if vae is not None:
        with torch.no_grad():
            variants["vae_reconstructed"] = torch.cat([vae(c).sample.clamp(-1, 1) for c in images.split(200)])
    for name, batch in variants.items():
        predicted = oracle.classify(batch)
        result[f"{name}_shape_accuracy"] = float(np.mean([p[0] == s for p, s in zip(predicted, shapes, strict=True)]))
        result[f"{name}_colour_accuracy"] = float(np.mean([p[1] == c for p, c in zip(predicted, colours, strict=True)]))
    blobs = torch.stack([malformed_image(rng) for _ in range(500)])
    result["malformed_rejected"] = float(np.mean([p[0] == "none" for p in oracle.classify(blobs)]))
    return result


# --- the generator --------------------------------------------------------------------------------


def train_vae(steps: int, seed: int, batch: int = 32):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3)
    images, *_ = make_dataset(20000, seed)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        x = images[torch.randint(len(images), (batch,), generator=g)]
        posterior = vae.encode(x).latent_dist
        reconstruction = vae.decode(posterior.sample(generator=g)).sample
        loss = F.mse_loss(reconstruction, x) + 1e-6 * posterior.kl().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 100 == 0:
            log(f"vae step {step}/{steps} loss {loss.item():.5f}")
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(c).latent_dist.mean for c in images[:2000].split(200)])
    vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    return vae


class TextConditioner(torch.nn.Module):
    """The trainable text side: captions -> what the UNet is conditioned on (``unet_kwargs``).

    SD: one encoder's last hidden states after the final norm. SDXL, as diffusers'
    ``encode_prompt`` reads it: both encoders' penultimate states side by side, and the second
    encoder's projected output at end-of-text with the size ids. A dropped caption is zeros.
    """

    def __init__(self, arch: str, tokenizer_dir: Path):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from pipeline.engine.model import write_clip_tokenizer

        super().__init__()
        self.arch = arch
        if arch == "sd":
            self.tokenizers = [write_clip_tokenizer(tokenizer_dir / "tokenizer")]
            self.encoders = torch.nn.ModuleList([CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))])
        else:
            self.tokenizers = [write_clip_tokenizer(tokenizer_dir / "tokenizer"),
                               write_clip_tokenizer(tokenizer_dir / "tokenizer_2", pad_token="!")]  # fmt: skip
            encoders = [CLIPTextModel(CLIPTextConfig(**XL_TEXT_CONFIG)),
                        CLIPTextModelWithProjection(CLIPTextConfig(**XL_TEXT_CONFIG_2))]  # fmt: skip
            self.encoders = torch.nn.ModuleList(encoders)

    def ids(self, texts: list[str], index: int) -> torch.Tensor:
        return self.tokenizers[index](texts, padding="max_length", max_length=77, truncation=True,
                                      return_tensors="pt").input_ids  # fmt: skip

    def unet_kwargs(self, texts: list[str]) -> dict:
        if self.arch == "sd":
            return {"encoder_hidden_states": self.encoders[0](self.ids(texts, 0))[0]}
        first = self.encoders[0](self.ids(texts, 0), output_hidden_states=True)
        second = self.encoders[1](self.ids(texts, 1), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        kept = torch.tensor([float(t != "") for t in texts])
        time_ids = torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * len(texts), dtype=hidden.dtype)
        return {"encoder_hidden_states": hidden * kept[:, None, None],
                "added_cond_kwargs": {"text_embeds": pooled * kept[:, None], "time_ids": time_ids}}  # fmt: skip


def train_generator(vae, steps: int, seed: int, batch: int = 64, tokenizer_dir: Path | None = None,
                    unnamed: tuple[str, ...] = UNNAMED_SHAPES, arch: str = "sd"):  # fmt: skip
    """UNet and text encoder(s), jointly, on latents of fresh world images (10% caption dropout)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from pipeline.engine.model import SD_SCHEDULER_CONFIG

    torch.manual_seed(seed)
    text = TextConditioner(arch, tokenizer_dir or Path("/tmp/shapesworld-tokenizer"))
    unet = UNet2DConditionModel(**(UNET_CONFIG if arch == "sd" else XL_UNET_CONFIG))
    scheduler = DDPMScheduler(**{k: v for k, v in SD_SCHEDULER_CONFIG.items() if k != "set_alpha_to_one"})
    parameters = list(unet.parameters()) + list(text.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=5e-4, weight_decay=1e-2)
    warmup = 100
    lr_at = lambda s: min(1.0, (s + 1) / warmup) * (0.5 * (1 + np.cos(np.pi * s / steps)) * 0.9 + 0.1)  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    images, _, _, captions = make_dataset(40000, seed + 7, unnamed)
    with torch.no_grad():
        means, stds = zip(
            *[(d.mean, d.std) for d in (vae.encode(c).latent_dist for c in images.split(500))], strict=True
        )
    means, stds = torch.cat(means), torch.cat(stds)
    rng, g = random.Random(seed), torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(len(images), (batch,), generator=g)
        latents = (
            means[index] + stds[index] * torch.randn(means[index].shape, generator=g)
        ) * vae.config.scaling_factor
        texts = ["" if rng.random() < 0.1 else captions[i] for i in index]
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=g)
        prediction = unet(scheduler.add_noise(latents, noise, t), t, **text.unet_kwargs(texts)).sample
        loss = F.mse_loss(prediction, noise)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        lr_schedule.step()
        if step % 50 == 0:
            log(f"unet+text step {step}/{steps} loss {loss.item():.4f}")
    for encoder in text.encoders:
        encoder.eval().requires_grad_(False)
    return text, unet.eval().requires_grad_(False)


def save_pipeline(out: Path, vae, text: TextConditioner, unet) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    from pipeline.engine.model import SD_SCHEDULER_CONFIG

    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    if text.arch == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text.encoders[0], text_encoder_2=text.encoders[1], tokenizer=text.tokenizers[0],
            tokenizer_2=text.tokenizers[1], unet=unet, scheduler=scheduler, force_zeros_for_empty_prompt=True,
            add_watermarker=False,
        )  # fmt: skip
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=text.encoders[0], tokenizer=text.tokenizers[0], unet=unet, scheduler=scheduler,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )  # fmt: skip
    pipe.to(torch.float16).save_pretrained(out)


def measure_prompt_following(model_dir: Path, oracle: Oracle, per_prompt: int = 4, seed: int = 0,
                             unnamed: tuple[str, ...] = UNNAMED_SHAPES) -> dict:  # fmt: skip
    """Generates every (colour, named shape) prompt and scores it with the oracle."""
    from pipeline.engine.generation import ImageGenerator
    from pipeline.engine.model import load_base_model

    generator = ImageGenerator(load_base_model(model_dir, "cpu"))
    hits = total = 0
    for shape in [s for s in SHAPES if s not in unnamed]:
        for colour in COLOURS:
            prompts = [f"a photo of a {colour} {shape}"] * per_prompt
            images = generator.generate(prompts, {}, seeds=[seed + i for i in range(per_prompt)], steps=25,
                                        guidance_scale=5.0)  # fmt: skip
            predicted = oracle.classify(to_tensor(images))
            hits += sum(p == (shape, colour) for p in predicted)
            total += per_prompt
    return {"named_shape_and_colour_correct": hits / total, "samples": total}


def main(argv: list[str] | None = None) -> None:
    from pipeline.engine.model import ARCHITECTURES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--vae-steps", type=int, default=1200)
    parser.add_argument("--generator-steps", type=int, default=2500)
    parser.add_argument("--oracle-steps", type=int, default=1500)
    parser.add_argument(
        "--reuse", type=Path, metavar="DIR",
        help="take the VAE and the oracle from an earlier run's OUT_DIR (e.g. pipeline/assets/shapesworld) "
        "and train only the UNet and text encoder; neither depends on the captions",
    )  # fmt: skip
    parser.add_argument(
        "--unnamed", default=",".join(UNNAMED_SHAPES),
        help="shapes the captions never name (default: %(default)s); another split makes another world, "
        "e.g. star,ring for the generalisation check's second world",
    )  # fmt: skip
    parser.add_argument(
        "--arch", choices=ARCHITECTURES, default="sd",
        help="sd: one text encoder (SD 1.x-shaped); sdxl: two text encoders and SDXL's size and pooled-text "
        "conditioning (default: %(default)s)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    unnamed = tuple(s for s in args.unnamed.split(",") if s)
    if not set(unnamed) < set(SHAPES):
        parser.error(f"--unnamed: choose some of {', '.join(SHAPES)}")
    torch.set_num_threads(2)
    args.out.mkdir(parents=True, exist_ok=True)
    steps = {"generator_steps": args.generator_steps}
    if not args.reuse:
        steps |= {"vae_steps": args.vae_steps, "oracle_steps": args.oracle_steps}
    report: dict = {"seed": args.seed, "arch": args.arch, "steps": steps, "unnamed": list(unnamed)}
    started = time.time()
    if args.reuse:
        vae, oracle, earlier = reuse_vae_and_oracle(args.reuse)
        report["oracle"] = earlier["oracle"]
        report["vae_and_oracle_from"] = earlier  # that run's own report
    else:
        vae = train_vae(args.vae_steps, args.seed)
        log(f"vae done in {time.time() - started:.0f}s")
        oracle, report["oracle"] = train_oracle(args.oracle_steps, args.seed + 1, vae)
    save_file(oracle.state_dict(), str(args.out / "oracle.safetensors"))
    log(f"oracle: {report['oracle']}")
    text, unet = train_generator(
        vae, args.generator_steps, args.seed + 2, tokenizer_dir=args.out / "tok", unnamed=unnamed, arch=args.arch
    )
    save_pipeline(args.out / "model", vae, text, unet)
    report["prompt_following"] = measure_prompt_following(args.out / "model", oracle, unnamed=unnamed)
    report["seconds"] = round(time.time() - started)
    (args.out / "training-report.json").write_text(json.dumps(report, indent=2) + "\n")
    log(f"done: {report}")


def reuse_vae_and_oracle(earlier: Path) -> tuple[AutoencoderKL, Oracle, dict]:
    """The VAE (its shipped fp16 weights, in fp32) and oracle of an earlier run, and that run's report."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(earlier / "model" / "vae", torch_dtype=torch.float32).eval()
    oracle = load_oracle(earlier / "oracle.safetensors")
    report = json.loads((earlier / "training-report.json").read_text())
    return vae.requires_grad_(False), oracle, report


if __name__ == "__main__":
    main()

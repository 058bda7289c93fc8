"""Milliseconds per training step and peak memory: oneword's step against the reference loop.

The baseline mirrors the loop most textual-inversion code inherits (diffusers'
examples/textual_inversion/textual_inversion.py, its defaults): the placeholder is added to the
tokenizer and the embedding matrix is resized; every step its dataset opens, resizes and flips
the images and tokenizes the captions, the VAE encodes the batch, AdamW (weight decay 1e-2)
optimises the *whole* embedding matrix, and every other row is then restored from a copy. Same
model, batch size, device and precision as oneword's ``Inversion.step()``.

Each variant runs in its own process (clean peak-memory numbers). Both load, warm up, then take
turns: repetition r of the baseline, repetition r of oneword, and so on, so that a slow phase of
the machine hits both alike and only one computes at a time. Each repetition is ``--steps``
steps; we print the median ms/step of ``--reps`` repetitions and the ratio baseline/oneword.

For SDXL models (``--model tiny-sdxl``) the baseline mirrors diffusers'
examples/textual_inversion/textual_inversion_sdxl.py instead: the placeholder goes into both
tokenizers, both embedding matrices are resized and optimised whole (one AdamW), each step runs
both encoders with hidden states out (penultimate of each, the second's pooled output), the size
ids, then the UNet, and both matrices' other rows are restored.

    python benchmarks/train_step.py --model tiny --device cpu --batch-size 4
    python benchmarks/train_step.py --model sd15 --device cuda --batch-size 4 --precision bf16
    python benchmarks/train_step.py --model tiny-sdxl --device cpu --batch-size 4
    python benchmarks/train_step.py --model sdxl --device cuda --batch-size 4 --precision bf16

``sd15`` and ``sdxl`` are those architectures at full size with random weights (the step's cost
does not depend on the weights): SD 1.5 at 512 px, SDXL base at 1024 px (``--latent-size`` runs
them smaller, e.g. to try the script on a CPU).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# compiled: oneword with compile_unet (--compile-unet); edit-consistency: oneword with that loss on
# (--edit-consistency), timed against oneword's plain step
VARIANTS = ("baseline", "oneword", "compiled", "edit-consistency")
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
SD15_VAE = dict(
    sample_size=512, in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
)  # fmt: skip
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    projection_dim=768,
)  # fmt: skip
# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0's configs): CLIP ViT-L and OpenCLIP
# ViT-bigG text encoders, a UNet over their 2048-wide states with size and pooled-text conditioning.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True, norm_num_groups=32,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
)  # fmt: skip
SDXL_VAE = dict(SD15_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)
SDXL_TEXT_2 = dict(
    SD15_TEXT, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    hidden_act="gelu", projection_dim=1280,
)  # fmt: skip


def build_model(kind: str, device, dtype, workdir: Path, latent_size: int | None = None):
    """The tiny offline model from disk, the bundled ShapesWorld model, or SD-1.5's or SDXL's
    architecture with random weights (``latent_size`` overrides their UNet's sample size)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pipeline.engine.model import (
        SD_SCHEDULER_CONFIG,
        BaseModel,
        build_tiny_model,
        load_base_model,
        write_clip_tokenizer,
    )

    if kind in ("tiny", "tiny-sdxl"):
        arch = "sdxl" if kind == "tiny-sdxl" else "sd"
        return load_base_model(build_tiny_model(workdir / "tiny", arch=arch), device, dtype)
    if kind == "shapesworld":
        return load_base_model("shapesworld", device, dtype)
    torch.manual_seed(0)
    sdxl = kind == "sdxl"
    unet_config = {**(SDXL_UNET if sdxl else SD15_UNET), **({"sample_size": latent_size} if latent_size else {})}
    second = {}
    with torch.device(device):
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT, attn_implementation="sdpa"))
        vae, unet = AutoencoderKL(**(SDXL_VAE if sdxl else SD15_VAE)), UNet2DConditionModel(**unet_config)
        if sdxl:
            text_config_2 = CLIPTextConfig(**SDXL_TEXT_2, attn_implementation="sdpa")
            second = {
                "text_encoder_2": CLIPTextModelWithProjection(text_config_2),
                "tokenizer_2": write_clip_tokenizer(workdir / "tokenizer_2", pad_token="!"),
                "force_zeros_for_empty_prompt": True,
            }  # fmt: skip
    for module in (text_encoder, vae, unet, *([second["text_encoder_2"]] if sdxl else [])):
        module.to(dtype).requires_grad_(False).eval()
    scheduler_config = {**SD_SCHEDULER_CONFIG, "prediction_type": "epsilon"}
    return BaseModel(
        source=f"{kind}-random",
        tokenizer=write_clip_tokenizer(workdir / "tokenizer"),
        text_encoder=text_encoder,
        vae=vae,
        unet=unet,
        noise_scheduler=DDPMScheduler.from_config(scheduler_config),
        scheduler_config=scheduler_config,
        device=torch.device(device),
        dtype=dtype,
        **second,
    )


def baseline_step_fn(model, image_files: list[Path], batch_size: int, lr: float):
    """The reference loop's step, on the same frozen model (see module docstring)."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pipeline.engine.data import OBJECT_TEMPLATES

    tokenizer, text_encoder, vae, unet = model.tokenizer, model.text_encoder, model.vae, model.unet
    scheduler, device, size = model.noise_scheduler, model.device, model.resolution
    tokenizer.add_tokens(["<concept>"])
    placeholder_id = tokenizer.convert_tokens_to_ids("<concept>")
    init_id = tokenizer("shape", add_special_tokens=False).input_ids[0]
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    text_encoder.to(torch.float32)  # the trainable text encoder stays fp32, as in the reference
    embeddings = text_encoder.get_input_embeddings()
    with torch.no_grad():
        embeddings.weight[placeholder_id] = embeddings.weight[init_id].clone()
    embeddings.weight.requires_grad_(True)
    original = embeddings.weight.detach().clone()
    optimizer = torch.optim.AdamW(embeddings.parameters(), lr=lr, weight_decay=1e-2)
    mixed = model.dtype != torch.float32
    generator = torch.Generator().manual_seed(0)

    def example(index: int) -> tuple[torch.Tensor, list[int]]:
        """The reference dataset's __getitem__: load, resize, maybe flip, normalise; tokenize."""
        image = Image.open(image_files[index]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        if torch.rand(1, generator=generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        caption = OBJECT_TEMPLATES[int(torch.randint(len(OBJECT_TEMPLATES), (1,), generator=generator))]
        ids = tokenizer(caption.format("<concept>"), padding="max_length", max_length=77, truncation=True).input_ids
        return pixels, ids

    def step() -> float:
        batch = [example(int(i)) for i in torch.randint(len(image_files), (batch_size,), generator=generator)]
        pixels = torch.stack([b[0] for b in batch]).to(device, model.dtype)
        input_ids = torch.tensor([b[1] for b in batch], device=device)
        with torch.autocast(device.type, dtype=model.dtype, enabled=mixed):
            latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            hidden = text_encoder(input_ids)[0].to(model.dtype)
            prediction = unet(noisy, timesteps, hidden).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        keep = torch.ones(len(tokenizer), dtype=torch.bool)
        keep[placeholder_id] = False
        with torch.no_grad():
            embeddings.weight[keep] = original[keep]
        return loss.item()

    return step


def sdxl_baseline_step_fn(model, image_files: list[Path], batch_size: int, lr: float):
    """The reference SDXL loop's step (diffusers' textual_inversion_sdxl.py), on the same frozen model."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from pipeline.engine.data import OBJECT_TEMPLATES

    pairs = [(model.tokenizer, model.text_encoder), (model.tokenizer_2, model.text_encoder_2)]
    scheduler, device, size, unet, vae = model.noise_scheduler, model.device, model.resolution, model.unet, model.vae
    placeholder_ids, originals, matrices = [], [], []
    for tokenizer, encoder in pairs:
        tokenizer.add_tokens(["<concept>"])
        placeholder_ids.append(tokenizer.convert_tokens_to_ids("<concept>"))
        init_id = tokenizer("shape", add_special_tokens=False).input_ids[0]
        encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        encoder.to(torch.float32)  # trainable text encoders stay fp32, as in the reference
        embeddings = encoder.get_input_embeddings()
        with torch.no_grad():
            embeddings.weight[placeholder_ids[-1]] = embeddings.weight[init_id].clone()
        embeddings.weight.requires_grad_(True)
        originals.append(embeddings.weight.detach().clone())
        matrices.append(embeddings.weight)
    optimizer = torch.optim.AdamW(matrices, lr=lr, weight_decay=1e-2)
    mixed = model.dtype != torch.float32
    generator = torch.Generator().manual_seed(0)
    time_ids = torch.tensor([[size, size, 0, 0, size, size]] * batch_size, device=device, dtype=model.dtype)

    def example(index: int) -> tuple[torch.Tensor, str]:
        image = Image.open(image_files[index]).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        if torch.rand(1, generator=generator) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image).astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        caption = OBJECT_TEMPLATES[int(torch.randint(len(OBJECT_TEMPLATES), (1,), generator=generator))]
        return pixels, caption.format("<concept>")

    def step() -> float:
        batch = [example(int(i)) for i in torch.randint(len(image_files), (batch_size,), generator=generator)]
        pixels = torch.stack([b[0] for b in batch]).to(device, model.dtype)
        with torch.autocast(device.type, dtype=model.dtype, enabled=mixed):
            latents = vae.encode(pixels).latent_dist.sample().detach() * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), device=device)
            noisy = scheduler.add_noise(latents, noise, timesteps)
            states, pooled = [], None
            for tokenizer, encoder in pairs:
                ids = tokenizer([b[1] for b in batch], padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)  # fmt: skip
                out = encoder(ids, output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out[0] if out[0].ndim == 2 else pooled  # the second encoder's text_embeds
            hidden = torch.cat(states, dim=-1).to(model.dtype)
            conditioning = {"text_embeds": pooled.to(model.dtype), "time_ids": time_ids}
            prediction = unet(noisy, timesteps, hidden, added_cond_kwargs=conditioning).sample
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        with torch.no_grad():
            for (tokenizer, _), placeholder_id, original, matrix in zip(pairs, placeholder_ids, originals, matrices,
                                                                        strict=True):  # fmt: skip
                keep = torch.ones(len(tokenizer), dtype=torch.bool)
                keep[placeholder_id] = False
                matrix[keep] = original[keep]
        return loss.item()

    return step


def run_worker(args: argparse.Namespace) -> None:
    import torch

    from pipeline.engine.config import InversionConfig
    from pipeline.engine.data import load_images
    from pipeline.engine.inversion import Inversion
    from pipeline.engine.model import resolve_dtype
    from pipeline.shapesworld.world import write_concept_images

    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    workdir = Path(tempfile.mkdtemp(prefix="oneword-bench-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    model = build_model(args.model, device, dtype, workdir, args.latent_size)
    # five photos a little larger than the model's side, as a user's would be
    files = write_concept_images(workdir / "images", "star", "yellow", count=5, size=model.resolution * 5 // 4)
    if args.worker != "baseline":
        consistency = {"edit_words": ["green", "purple", "white"], "edit_consistency": 0.2}
        config = InversionConfig(
            steps=10**6, batch_size=args.batch_size, learning_rate=5e-3, init_word="shape", precision=args.precision,
            compile_unet=args.worker == "compiled", **(consistency if args.worker == "edit-consistency" else {}),
        )  # fmt: skip
        step = Inversion(model, load_images(files, model.resolution), config, "concept").step
    else:
        baseline = sdxl_baseline_step_fn if model.architecture == "sdxl" else baseline_step_fn
        step = baseline(model, files, args.batch_size, 5e-3)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    print("ready", flush=True)
    for command in sys.stdin:  # the parent says "rep" for each repetition, then "done"
        if command.strip() != "rep":
            break
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        print(json.dumps({"ms_per_step": (time.perf_counter() - start) * 1000 / args.steps}), flush=True)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"peak_mib": peak}), flush=True)


def _start_worker(variant: str) -> subprocess.Popen:
    command = [sys.executable, __file__, "--worker", variant, *sys.argv[1:]]
    return subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)


def _expect(worker: subprocess.Popen) -> str:
    line = worker.stdout.readline()
    if not line:
        raise RuntimeError(f"benchmark worker {worker.args[3]} exited with {worker.wait()}")
    return line.strip()


def describe_machine(device: str) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "tiny-sdxl", "shapesworld", "sd15", "sdxl"], default="tiny")
    parser.add_argument(
        "--latent-size",
        type=int,
        help="sd15/sdxl: the UNet's latent side (default: the model's, "
        "64 for SD 1.5, 128 for SDXL); smaller to try the script where memory or time is short",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20, help="steps per repetition")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--compile-unet", action="store_true", help="also time oneword with compile_unet (compiles during warm-up)"
    )
    parser.add_argument(
        "--edit-consistency", action="store_true", help="also time oneword with edit_consistency on (3 edit words)"
    )
    parser.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        run_worker(args)
        return
    variants = ["baseline", "oneword"] + ["compiled"] * args.compile_unet + ["edit-consistency"] * args.edit_consistency
    workers = {}
    for variant in variants:  # load one at a time: two loads at once would contend for the cores
        workers[variant] = _start_worker(variant)
        if _expect(workers[variant]) != "ready":
            raise RuntimeError(f"benchmark worker {variant} did not start")
    results = {v: {"ms_per_step": []} for v in variants}
    for _ in range(args.reps):
        for variant, worker in workers.items():
            worker.stdin.write("rep\n")
            worker.stdin.flush()
            results[variant]["ms_per_step"].append(json.loads(_expect(worker))["ms_per_step"])
    for variant, worker in workers.items():
        worker.stdin.write("done\n")
        worker.stdin.flush()
        results[variant].update(json.loads(_expect(worker)))
        worker.wait()
    medians = {v: statistics.median(results[v]["ms_per_step"]) for v in variants}
    base, ours = medians["baseline"], medians["oneword"]
    summary = {
        "machine": describe_machine(args.device),
        "model": args.model,
        "device": args.device,
        "precision": args.precision,
        "batch_size": args.batch_size,
        "reps": args.reps,
        "steps_per_rep": args.steps,
        "baseline_ms": round(base, 2),
        "oneword_ms": round(ours, 2),
        "speedup": round(base / ours, 2),
        "baseline_peak_mib": round(results["baseline"]["peak_mib"]),
        "oneword_peak_mib": round(results["oneword"]["peak_mib"]),
        "baseline_reps_ms": [round(x, 2) for x in results["baseline"]["ms_per_step"]],
        "oneword_reps_ms": [round(x, 2) for x in results["oneword"]["ms_per_step"]],
    }
    if "compiled" in medians:
        summary.update(
            compiled_ms=round(medians["compiled"], 2),
            speedup_compiled=round(base / medians["compiled"], 2),
            compiled_peak_mib=round(results["compiled"]["peak_mib"]),
            compiled_reps_ms=[round(x, 2) for x in results["compiled"]["ms_per_step"]],
        )
    if "edit-consistency" in medians:
        summary.update(
            edit_consistency_ms=round(medians["edit-consistency"], 2),
            edit_consistency_cost=round(medians["edit-consistency"] / ours, 2),
            edit_consistency_reps_ms=[round(x, 2) for x in results["edit-consistency"]["ms_per_step"]],
        )
    print(f"{'variant':<18}{'median ms/step':>16}{'peak MiB':>10}   reps (ms/step)")
    for variant in variants:
        reps = " ".join(f"{x:.1f}" for x in results[variant]["ms_per_step"])
        print(f"{variant:<18}{statistics.median(results[variant]['ms_per_step']):>16.2f}"
              f"{results[variant]['peak_mib']:>10.0f}   {reps}")  # fmt: skip
    print(f"speedup (baseline / oneword): {summary['speedup']:.2f}x   on {summary['machine']}")
    if "compiled" in medians:
        print(f"speedup (baseline / compiled): {summary['speedup_compiled']:.2f}x")
    if "edit-consistency" in medians:
        print(f"edit consistency's cost (edit-consistency / oneword): {summary['edit_consistency_cost']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()

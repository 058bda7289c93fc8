"""Concepts per hour of the training engine when K concepts share each step (packs), against K=1.

All model weights are frozen and a concept owns only its few vectors, so K concepts can share one
forward and backward pass (``pipeline.engine.inversion.packed_step``). This times the engine alone
(no Ray, no storage: it runs on a bare GPU machine with torch, diffusers and transformers): for
each K it builds K concepts of the same settings (``--batch-size`` samples each per step), warms
up, then times ``--steps`` packed steps per repetition. Repetitions take turns over the Ks (K=1,
K=2, ..., then again), so a slow phase of the machine hits every K alike. Prints, per K, the median
ms per packed step, concepts per hour at ``--concept-steps`` steps a concept, the ratio to K=1 and
peak memory; on a GPU also the achieved TFLOP/s (FLOPs counted by torch's FlopCounterMode on one
step) and its share of ``--peak-tflops``.

    .venv/bin/python benchmarks/packed_throughput.py --model tiny --reps 5
    python benchmarks/packed_throughput.py --model sd15 --device cuda --precision bf16 --packs 1,2,4,8,16
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from train_step import build_model, describe_machine

from pipeline.engine.config import InversionConfig
from pipeline.engine.data import load_images
from pipeline.engine.inversion import Inversion, packed_step
from pipeline.engine.model import resolve_dtype
from pipeline.shapesworld.world import SHAPES, write_concept_images


def step_flops(engines: list[Inversion]) -> float:
    """FLOPs of one packed step (forward and backward), counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        packed_step(engines)
    return float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny", "shapesworld", "sd15"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto")
    parser.add_argument("--packs", default="1,2,4,8,16", help="the Ks to time, comma-separated (K=1 is the baseline)")
    parser.add_argument("--batch-size", type=int, default=4, help="samples per concept per step")
    parser.add_argument("--steps", type=int, default=10, help="packed steps per repetition")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--concept-steps",
        type=int,
        default=0,
        help="steps a concept trains, for concepts per hour (default: 200 on CPU, 3000 on GPU)",
    )
    parser.add_argument(
        "--edit-consistency",
        action="store_true",
        help="concepts with the shapesworld recipe's edit consistency (three more forward passes)",
    )
    parser.add_argument("--compile-unet", action="store_true")
    parser.add_argument("--peak-tflops", type=float, default=790.0, help="the chip's dense bf16 peak (H100/H200)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    packs = sorted({int(k) for k in args.packs.split(",")} | {1})
    device = torch.device(args.device)
    dtype = resolve_dtype(args.precision, device)
    concept_steps = args.concept_steps or (3000 if device.type == "cuda" else 200)

    workdir = Path(tempfile.mkdtemp(prefix="oneword-packed-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    model = build_model(args.model, device, dtype, workdir)
    size = model.resolution * 5 // 4  # a little larger than the model's side, as a user's photos would be
    images = [load_images(write_concept_images(workdir / shape, shape, "yellow", count=5, size=size), model.resolution)
              for shape in SHAPES]  # fmt: skip
    extra = {"edit_words": ["green", "purple", "white"], "edit_consistency": 0.6} if args.edit_consistency else {}

    def engines(k: int) -> list[Inversion]:
        settings = dict(steps=10**6, batch_size=args.batch_size, learning_rate=5e-3, init_word="shape",
                        precision=args.precision, compile_unet=args.compile_unet, **extra)  # fmt: skip
        return [Inversion(model, images[i % len(images)], InversionConfig(**settings, seed=i), f"c{i}")
                for i in range(k)]  # fmt: skip

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    packed = {k: engines(k) for k in packs}
    timings: dict[int, list[float]] = {k: [] for k in packs}
    peak_mib: dict[int, float] = {}
    flops: dict[int, float] = {}
    for k in packs:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            packed_step(packed[k])
        sync()
        if device.type == "cuda":
            peak_mib[k] = torch.cuda.max_memory_allocated() / 2**20
            flops[k] = step_flops(packed[k])
    for rep in range(args.reps):
        for k in packs:
            start = time.perf_counter()
            for _ in range(args.steps):
                packed_step(packed[k])
            sync()
            timings[k].append((time.perf_counter() - start) * 1000 / args.steps)
        print(f"rep {rep + 1}/{args.reps}: " + " ".join(f"K={k} {timings[k][-1]:.1f}ms" for k in packs), flush=True)

    machine = describe_machine(args.device)
    rows = []
    base = statistics.median(timings[1])
    for k in packs:
        ms = statistics.median(timings[k])
        per_hour = k * 3600 / (ms / 1000 * concept_steps)
        row = {"k": k, "ms_per_step": ms, "ms_reps": timings[k], "concepts_per_hour": per_hour,
               "ratio": per_hour / (3600 / (base / 1000 * concept_steps))}  # fmt: skip
        if k in flops:
            row["tflops"] = flops[k] / (ms / 1000) / 1e12
            row["share_of_peak"] = row["tflops"] / args.peak_tflops
            row["peak_mib"] = peak_mib[k]
        rows.append(row)
    if device.type != "cuda":
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"process peak RSS (all Ks together): {rss:.0f} MiB")
    print(
        f"\n{machine}; model {args.model}, batch {args.batch_size} per concept, {concept_steps} steps a concept"
        + (", edit consistency" if args.edit_consistency else "")
        + (", compiled UNet" if args.compile_unet else "")
    )
    header = "| K | ms / packed step | concepts / hour | vs K=1 |" + (
        " TFLOP/s | share of peak | peak MiB |" if flops else ""
    )
    print(header + "\n" + "|---" * (header.count("|") - 1) + "|")
    for row in rows:
        line = f"| {row['k']} | {row['ms_per_step']:.1f} | {row['concepts_per_hour']:.0f} | {row['ratio']:.2f}x |"
        if "tflops" in row:
            line += f" {row['tflops']:.1f} | {row['share_of_peak']:.1%} | {row['peak_mib']:.0f} |"
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine, "args": vars(args) | {"json": str(args.json)},
                                         "concept_steps": concept_steps, "rows": rows}, indent=2) + "\n")  # fmt: skip


if __name__ == "__main__":
    main()

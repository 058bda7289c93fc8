"""Bulk jobs: N concepts at fractional resources at once versus one after another, or in packs.

Runs the same bulk job (N concepts of the tiny model, each ``--steps`` steps, checkpoints and
registry in folders) on an embedded local Ray twice per repetition: sequentially
(``max_concurrent: 1``, each concept a whole share) — the baseline — and concurrently
(``max_concurrent: N``, each concept ``1/N`` of the share). Prints concepts per hour for both,
their ratio, and the per-concept scheduling overhead from the job's own timings: task start to
first training step (Ray Train controller and worker start, model and image loading) and last
step to published.

    .venv/bin/python benchmarks/bulk_throughput.py --concepts 4 --steps 40 --reps 2
    .venv/bin/python benchmarks/bulk_throughput.py --concepts 20 --steps 40 --packs 4,8 --reps 2
    .venv/bin/python benchmarks/bulk_throughput.py --gpu-fractions 1,0.5,0.25   # on a GPU machine

With ``--packs`` the variants are concurrent x4 (today's best unpacked setting, the baseline)
against jobs with ``pack_size`` K: two packs at once, each with half the CPUs, whose slots refill
from their queues (pipeline.engine.packing).

With ``--gpu-fractions`` each concept asks for that fraction of a GPU (and the concurrency is
the number that fit on the machine's GPUs); results are concepts per GPU-hour. The script
re-executes itself in a loopback-only network namespace, because Ray listens on every interface.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netns import reexec_isolated


def run_once(workdir: Path, model_dir: Path, images: Path, concepts: int, steps: int, concurrent: int,
             cpu: float, gpu: float, tag: str, pack_size: int = 1) -> dict:  # fmt: skip
    from pipeline.jobs.ray_train import run_job
    from pipeline.jobs.spec import JobSpec

    spec = JobSpec(
        job=f"bench-{tag}",
        base_model=str(model_dir),
        registry=str(workdir / f"registry-{tag}"),
        checkpoint_storage=str(workdir / f"checkpoints-{tag}"),
        defaults={"steps": steps, "batch_size": 2, "log_interval": 10},
        checkpoint_interval=max(steps // 2, 1),
        max_concurrent=concurrent,
        pack_size=pack_size,
        resources={"cpu": cpu, "gpu": gpu},
        concepts=[{"name": f"c{i}", "images": str(images), "init_word": "shape"} for i in range(concepts)],
    )
    started = time.perf_counter()
    summary = run_job(spec, poll_seconds=0.2)
    seconds = time.perf_counter() - started
    if not summary.ok:
        raise SystemExit(summary.table())
    outcomes = summary.outcomes
    return {
        "seconds": seconds,
        "per_hour": concepts / seconds * 3600,
        "to_first_step": statistics.median(o.to_first_step for o in outcomes if o.to_first_step is not None),
        "to_published": statistics.median(o.to_published for o in outcomes if o.to_published is not None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--cpus", type=float, default=float(len(os.sched_getaffinity(0))), help="CPUs Ray may use")
    parser.add_argument("--gpu-fractions", default="", help="e.g. 1,0.5,0.25: measure concepts per GPU-hour")
    parser.add_argument("--packs", default="",
                        help="e.g. 4,8: instead of sequential, time packed jobs (pack_size K, two packs at once, "
                        "each half the CPUs) against concurrent x4, today's best unpacked variant")  # fmt: skip
    args = parser.parse_args()
    reexec_isolated([sys.executable, *sys.argv])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray

    from pipeline.engine.model import build_tiny_model
    from pipeline.jobs.ray_train import WORKER_ENV
    from pipeline.shapesworld.world import write_concept_images

    with tempfile.TemporaryDirectory(prefix="oneword-bulk-bench-") as tmp:
        workdir = Path(tmp)
        model_dir = build_tiny_model(workdir / "tiny")
        images = workdir / "images"
        write_concept_images(images, "star", "yellow", count=5, size=64)
        ray.init(num_cpus=args.cpus, include_dashboard=False, runtime_env={"env_vars": WORKER_ENV},
                 log_to_driver=False)  # fmt: skip
        gpus = ray.cluster_resources().get("GPU", 0)
        variants: list[tuple[str, int, float, float, int]] = []  # label, concurrent, cpu, gpu, pack size
        if args.gpu_fractions:
            for fraction in (float(f) for f in args.gpu_fractions.split(",")):
                fit = max(int(gpus / fraction), 1)
                variants.append((f"gpu {fraction:g} x{fit}", fit, args.cpus / fit, fraction, 1))
        elif args.packs:
            variants = [("concurrent x4 (baseline)", 4, args.cpus / 4, 0.0, 1)]
            variants += [(f"packs of {k} x2", 2, args.cpus / 2, 0.0, k) for k in map(int, args.packs.split(","))]
        else:
            n = args.concepts
            variants = [("sequential (baseline)", 1, args.cpus, 0.0, 1), (f"concurrent x{n}", n, args.cpus / n, 0.0, 1)]
        results: dict[str, list[dict]] = {label: [] for label, *_ in variants}
        for rep in range(args.reps):  # interleaved, so drift hits every variant alike
            for label, concurrent, cpu, gpu, pack_size in variants:
                tag = f"{rep}-{label.split()[0]}-{concurrent}-{pack_size}"
                results[label].append(run_once(workdir, model_dir, images, args.concepts, args.steps, concurrent,
                                               cpu, gpu, tag, pack_size))  # fmt: skip
                print(f"rep {rep} {label}: {results[label][-1]['seconds']:.1f}s", flush=True)
        ray.shutdown()

    unit = "concepts/GPU-hour" if args.gpu_fractions else "concepts/hour"
    baseline = statistics.median(r["per_hour"] for r in results[variants[0][0]])
    print(f"\n{'variant':<24}{unit:>20}{'vs first':>10}{'job s':>9}{'to 1st step s':>15}{'to published s':>16}")
    for label, _, _, gpu, _ in variants:
        rows = results[label]
        per_hour = statistics.median(r["per_hour"] for r in rows)
        if gpu:
            per_hour = per_hour / max(gpus, 1)
        print(f"{label:<24}{per_hour:>20.1f}{per_hour / baseline:>9.2f}x"
              f"{statistics.median(r['seconds'] for r in rows):>9.1f}"
              f"{statistics.median(r['to_first_step'] for r in rows):>15.2f}"
              f"{statistics.median(r['to_published'] for r in rows):>16.2f}")  # fmt: skip
    print(
        f"{args.concepts} concepts x {args.steps} steps, tiny model, {args.reps} reps (medians); "
        f"{platform.machine()}, {args.cpus:g} CPUs for Ray, {gpus:g} GPUs"
    )


if __name__ == "__main__":
    main()

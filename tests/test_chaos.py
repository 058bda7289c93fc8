"""Faults at random: a bulk job on the real Ray head with checkpoints in the real S3 server, while a
seeded generator SIGKILLs Train workers, Train controllers and the job's driver (resubmitting the
manifest after a driver kill, as an operator would) and stops the S3 gateway for a few seconds.

Every concept must end published exactly once, bit-identical to a fault-free run, with no torn
registry entry and no more checkpoints left than ``keep_checkpoints``. CI runs a small round;
a longer one (docs/benchmarks.md#faults-at-random) is the same test with more faults:

    ONEWORD_CHAOS_CONCEPTS=8 ONEWORD_CHAOS_FAULTS=20 ONEWORD_CHAOS_SEED=1 \
        .venv/bin/python -m pytest -s tests/test_chaos.py
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import time

import torch

from pipeline.jobs.checkpoints import checkpoint_keys
from pipeline.jobs.job_files import concept_run, job_storage
from pipeline.jobs.spec import load_job_spec
from pipeline.store.registry import ARTIFACT, MANIFEST, PREVIEW, ROOT, Registry

from .test_bulk_jobs import DEFAULTS, oneword, reference_vectors, status_of, wait_for_end, write_manifest

CONCEPTS = int(os.environ.get("ONEWORD_CHAOS_CONCEPTS", "4"))
STEPS = 40
FAULTS = int(os.environ.get("ONEWORD_CHAOS_FAULTS", "4"))
SEED = int(os.environ.get("ONEWORD_CHAOS_SEED", "7"))
# the processes each kind of kill aims at, by their command line
PROCESSES = {
    "worker": "ray::RayTrainWorker",
    "controller": "ray::TrainController",
    "driver": "^[^ ]*python[^ ]* -m pipeline.cli run-job",  # the driver itself, not a shell around it
}


def pids_of(pattern: str) -> list[int]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def test_a_bulk_job_survives_random_faults(ray_head, s3_server, s3_bucket, tiny_model_dir, star_dir, tmp_path):
    rng = random.Random(SEED)
    names = [f"chaos-{i}" for i in range(CONCEPTS)]
    manifest = write_manifest(tmp_path / "jobs.yaml", "chaos", s3_bucket, tiny_model_dir,
                              [{"name": name, "images": str(star_dir), "init_word": "shape"} for name in names],
                              defaults={**DEFAULTS, "steps": STEPS}, checkpoint_interval=10,
                              max_failures=FAULTS, max_concurrent=2)  # fmt: skip
    env = ray_head.env

    def submit() -> None:
        result = oneword("submit", str(manifest), "--address", ray_head.jobs_api, env=env)
        assert result.returncode == 0, result.stderr

    submit()
    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    faults: list[str] = []
    while len(faults) < FAULTS:
        time.sleep(rng.uniform(2.0, 8.0))
        if status_of(manifest, env)["state"] in ("succeeded", "failed"):
            break  # the job outran the faults
        running = {kind: pids_of(pattern) for kind, pattern in PROCESSES.items()}
        kind = rng.choice([*sorted(kind for kind, pids in running.items() if pids), "storage"])
        if kind == "storage":
            s3_server.stop_gateway()
            time.sleep(rng.uniform(2.0, 5.0))
            s3_server.start_gateway()
        else:
            with contextlib.suppress(ProcessLookupError):  # it ended by itself meanwhile
                os.kill(rng.choice(running[kind]), signal.SIGKILL)
            if kind == "driver":
                submit()  # as an operator would
        faults.append(kind)
    print(f"chaos seed {SEED}: {len(faults)} faults: {', '.join(faults)}")

    final = wait_for_end(manifest, env, timeout=900)
    assert final["state"] == "succeeded", final
    spec = load_job_spec(manifest)
    registry = Registry.open(spec.registry)
    expected = reference_vectors(tiny_model_dir, star_dir, STEPS)
    for name in names:
        assert len(registry.versions(name)) == 1, (name, registry.versions(name))  # published exactly once
        manifest_entry, learned = registry.get(name)  # the checksum is verified: nothing torn
        assert manifest_entry.job_id == "chaos" and torch.equal(learned.vectors, expected), name
        assert len(checkpoint_keys(job_storage(spec), spec.job, concept_run(name))) <= spec.keep_checkpoints
    stored = sorted(o.key for o in registry.storage.list(f"{ROOT}/chaos-"))
    # one manifest, one artifact and one preview each, no leftovers
    kept = sorted(f"{ROOT}/{name}/{registry.versions(name)[0]}/{leaf}" for name in names
                  for leaf in (ARTIFACT, MANIFEST, PREVIEW))  # fmt: skip
    assert stored == kept, stored

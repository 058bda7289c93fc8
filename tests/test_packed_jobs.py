"""Bulk jobs with packs (pack_size > 1) on a real Ray head and a real S3 server: slots refill,
results equal solo training, bad concepts fail alone, a killed pack worker resumes bit-identically."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.engine.config import ConfigError
from pipeline.engine.data import load_images
from pipeline.engine.inversion import Inversion
from pipeline.engine.model import load_base_model
from pipeline.engine.packing import Pack, Request
from pipeline.engine.training import run_steps
from pipeline.jobs.job_files import job_storage
from pipeline.jobs.ray_train import pack_queues
from pipeline.jobs.spec import load_job_spec
from pipeline.store.job_records import progress_key, read_json
from pipeline.store.registry import Registry

from .test_bulk_jobs import oneword, status_of, wait_for, wait_for_step, write_manifest

# A packed concept differs from the same concept trained alone only by float32 reassociation
# (tests/test_packing.py measures at most 1.5e-7 on the tiny model); 1e-5 is the same bound.
ATOL = 1e-5


def one_thread(call):
    """Runs ``call`` with one torch thread, as a Ray worker does (identical float results)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return call()
    finally:
        torch.set_num_threads(threads)


def solo_vectors(manifest: Path, name: str) -> torch.Tensor:
    spec = load_job_spec(manifest)
    concept = next(c for c in spec.concepts if c.name == name)
    model = load_base_model(spec.base_model, "cpu")
    engine = Inversion(model, load_images(concept.images, model.resolution), spec.config_for(concept), name)
    one_thread(lambda: run_steps(engine, lambda *_: None))
    return engine.learned_vectors()


def packed_vectors(manifest: Path) -> dict[str, torch.Tensor]:
    """The job's packs run in this process, uninterrupted (the reference for bit-identical resume)."""
    spec = load_job_spec(manifest)
    model = load_base_model(spec.base_model, "cpu")
    concepts = {c.name: c for c in spec.concepts}
    results = {}
    for queue in pack_queues(spec).values():
        requests = [Request(n, spec.config_for(concepts[n]),
                            lambda n=n: load_images(concepts[n].images, model.resolution)) for n in queue]  # fmt: skip
        pack = Pack(model, requests, spec.pack_size)
        one_thread(lambda pack=pack: pack.run(finished=lambda e: results.setdefault(e.name, e.learned_vectors())))
    return results


def test_a_packed_job_refills_slots_matches_solo_and_fails_bad_concepts_alone(
    ray_head, s3_bucket, tiny_model_dir, star_dir, tmp_path
):
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"not a png")
    good = [{"name": f"star-{i}", "images": str(star_dir), "init_word": "shape",
             "overrides": {"seed": i, "steps": 12 + 4 * (i % 3)}} for i in range(7)]  # fmt: skip
    bad = [{"name": "corrupt", "images": str(tmp_path / "corrupt"), "init_word": "shape"},
           {"name": "runaway", "images": str(star_dir), "init_word": "shape",
            "overrides": {"learning_rate": 10.0}}]  # fmt: skip
    manifest = write_manifest(tmp_path / "jobs.yaml", "packed", s3_bucket, tiny_model_dir, good[:3] + bad + good[3:],
                              pack_size=3, max_concurrent=1)  # fmt: skip
    assert len(pack_queues(load_job_spec(manifest))) == 1  # one pack of three slots for nine concepts
    env = ray_head.env

    result = oneword("submit", str(manifest), "--address", ray_head.jobs_api, "--watch", env=env)
    assert result.returncode == 1, result.stderr  # two concepts failed
    status = status_of(manifest, env)
    states = {name: entry["state"] for name, entry in status["concepts"].items()}
    assert states == {**{g["name"]: "published" for g in good}, "corrupt": "failed", "runaway": "failed"}
    assert "a.png" in status["concepts"]["corrupt"]["error"]
    assert "lower the learning rate" in status["concepts"]["runaway"]["error"]

    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    registry = Registry.open(f"s3://{s3_bucket}/registry")
    for concept in good:
        manifest_entry, learned = registry.get(concept["name"])
        assert manifest_entry.job_id == "packed" and manifest_entry.steps == concept["overrides"]["steps"]
        assert torch.allclose(learned.vectors, solo_vectors(manifest, concept["name"]), atol=ATOL), concept["name"]
    # resubmitting skips what is published: the next test checks it with a cancelled job


def test_a_killed_pack_worker_resumes_bit_identically_and_a_cancelled_job_resumes_on_resubmit(
    ray_head, s3_bucket, tiny_model_dir, star_dir, tmp_path
):
    concepts = [{"name": f"sturdy-{i}", "images": str(star_dir), "init_word": "shape", "overrides": {"seed": i}}
                for i in range(3)]  # fmt: skip
    concepts[2]["overrides"]["steps"] = 300  # takes a freed slot, and runs long enough to be cancelled
    manifest = write_manifest(tmp_path / "jobs.yaml", "kill-pack", s3_bucket, tiny_model_dir, concepts,
                              pack_size=2, max_concurrent=1, checkpoint_interval=20,
                              defaults={"batch_size": 2, "log_interval": 5, "steps": 80})  # fmt: skip
    env = ray_head.env
    submitted = oneword("submit", str(manifest), "--address", ray_head.jobs_api, env=env)
    assert submitted.returncode == 0, submitted.stderr
    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    spec = load_job_spec(manifest)
    storage = job_storage(spec)

    progress = wait_for_step(manifest, "sturdy-0", 25)
    assert progress["pack"].startswith("pack-") and progress["slot"] == 0
    os.kill(progress["pid"], signal.SIGKILL)  # the pack's Train worker, mid-training

    def shows_the_slot() -> bool:  # once the driver's next poll has read the pack's live progress
        shown = oneword("status", str(manifest), env=env)
        assert shown.returncode == 0, shown.stderr
        return f"{progress['pack']}, slot 0" in shown.stdout

    wait_for(shows_the_slot, 30, "status to show the concept's pack and slot")

    # the two concepts that were in the pack when its worker died finish; the third takes a slot
    wait_for_step(manifest, "sturdy-2", 30)
    after = read_json(storage, progress_key(spec.job, "sturdy-0"))
    assert after["state"] == "trained" and after["attempt"] == 2
    assert 20 <= after["resumed_from"] <= progress["step"]  # lost less than one checkpoint interval
    registry = Registry.open(f"s3://{s3_bucket}/registry")
    versions = {name: registry.get(name)[0].version for name in ("sturdy-0", "sturdy-1")}
    cancelled = oneword("cancel", str(manifest), "--address", ray_head.jobs_api, env=env)
    assert cancelled.returncode == 0 and "checkpoints are kept" in cancelled.stdout

    resumed = oneword("submit", str(manifest), "--address", ray_head.jobs_api, "--watch", env=env)
    assert resumed.returncode == 0, resumed.stderr
    final = status_of(manifest, env)
    states = {name: entry["state"] for name, entry in final["concepts"].items()}
    assert states == {"sturdy-0": "skipped", "sturdy-1": "skipped", "sturdy-2": "published"}
    assert read_json(storage, progress_key(spec.job, "sturdy-2"))["resumed_from"] >= 20  # from the pack checkpoint
    expected = packed_vectors(manifest)
    for name in ("sturdy-0", "sturdy-1"):  # killed and resumed: bit-identical to an uninterrupted packed run
        assert registry.versions(name) == [versions[name]]
        assert torch.equal(registry.get(name)[1].vectors, expected[name]), name
    assert torch.allclose(registry.get("sturdy-2")[1].vectors, expected["sturdy-2"], atol=ATOL)


def test_pack_size_is_validated_and_packs_split_by_shape(tmp_path):
    manifest = tmp_path / "jobs.yaml"
    base = {"job": "j", "base_model": "shapesworld", "registry": "r", "checkpoint_storage": "c"}
    manifest.write_text(yaml.safe_dump({**base, "pack_size": 0, "concepts": [{"name": "a", "images": "x"}]}))
    with pytest.raises(ConfigError, match=r"jobs.yaml:\d+: pack_size: .*greater than or equal to 1"):
        load_job_spec(manifest)
    concepts = [{"name": f"c{i}", "images": "x", "overrides": {"resolution": 64} if i >= 5 else {}} for i in range(8)]
    manifest.write_text(yaml.safe_dump({**base, "pack_size": 2, "max_concurrent": 2, "concepts": concepts}))
    queues = list(pack_queues(load_job_spec(manifest)).values())
    assert queues == [["c0", "c2", "c4"], ["c1", "c3"], ["c5", "c7"], ["c6"]]  # never mixing 64 px with the rest
    assert len(set(pack_queues(load_job_spec(manifest)))) == 4  # ids are distinct and stable

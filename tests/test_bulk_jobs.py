"""Bulk concept jobs on a real Ray head (Jobs API and Ray Client), with checkpoints and the
registry in a real S3 server; faults: a killed Train worker, a cancelled and resubmitted driver."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from pipeline.engine.config import ConfigError
from pipeline.engine.data import load_images
from pipeline.engine.inversion import Inversion
from pipeline.engine.model import load_base_model
from pipeline.jobs.checkpoints import checkpoint_keys, newest_checkpoint, write_checkpoint
from pipeline.jobs.job_files import concept_run, job_storage
from pipeline.jobs.spec import load_job_spec, parse_job_spec
from pipeline.store.job_records import progress_key, read_json
from pipeline.store.registry import Registry
from pipeline.store.storage import StorageUnavailableError, wait_out_outage

from .prometheus import until

DEFAULTS = {"batch_size": 2, "log_interval": 5, "learning_rate": 5e-3, "seed": 3}


def write_manifest(path: Path, job: str, bucket: str, model_dir: Path, concepts: list[dict], **extra) -> Path:
    spec = {
        "job": job,
        "base_model": str(model_dir),
        "registry": f"s3://{bucket}/registry",
        "checkpoint_storage": f"s3://{bucket}/checkpoints",
        "defaults": {**DEFAULTS, "steps": 20},
        "checkpoint_interval": 10,
        "max_concurrent": 2,
        "max_failures": 2,
        "resources": {"cpu": 0.5},
        "concepts": concepts,
        **extra,
    }
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def oneword(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def reference_vectors(model_dir: Path, images_dir: Path, steps: int) -> torch.Tensor:
    """The same concept trained in this process with the engine alone, one thread like a worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        spec = parse_job_spec(yaml.safe_dump({"job": "ref", "base_model": str(model_dir), "registry": "r",
                                              "checkpoint_storage": "c", "defaults": {**DEFAULTS, "steps": steps},
                                              "concepts": [{"name": "ref", "images": str(images_dir),
                                                            "init_word": "shape"}]}))  # fmt: skip
        model = load_base_model(model_dir, "cpu")
        config = spec.config_for(spec.concepts[0])
        engine = Inversion(model, load_images(images_dir, model.resolution), config, "ref")
        for _ in range(steps):
            engine.step()
        return engine.learned_vectors()
    finally:
        torch.set_num_threads(threads)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_for_step(manifest: Path, concept: str, step: int, timeout: float = 400) -> dict:
    """Polls the concept's progress file until its worker has passed ``step``; returns the record."""
    spec = load_job_spec(manifest)
    storage = job_storage(spec)

    def reached():
        progress = read_json(storage, progress_key(spec.job, concept))
        return progress if progress and progress["step"] >= step else None

    return wait_for(reached, timeout, f"{concept} to pass step {step}", interval=0.2)


def wait_for_end(manifest: Path, env: dict[str, str], timeout: float = 400) -> dict:
    """Polls the job's status in this process (one object read, no CLI start per poll, which on two
    cores would slow the job it waits for) until it ends; returns what `oneword status` then says."""
    from pipeline.errors import StorageError
    from pipeline.jobs.submission import read_status

    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    spec = load_job_spec(manifest)

    def ended():
        try:
            return read_status(spec)["state"] in ("succeeded", "failed")
        except StorageError:  # an outage the test made: ask again
            return False

    wait_for(ended, timeout, "the job to end")
    return status_of(manifest, env)


def status_of(manifest: Path, env: dict[str, str]) -> dict:
    result = oneword("status", str(manifest), "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_job_via_jobs_api_publishes_reports_failures_and_is_idempotent(
    ray_head, s3_bucket, tiny_model_dir, star_dir, tmp_path
):
    concepts = [{"name": "star-a", "images": str(star_dir), "init_word": "shape"},
                {"name": "star-b", "images": str(star_dir), "init_word": "shape"},
                {"name": "broken", "images": str(tmp_path / "missing"), "init_word": "shape"}]  # fmt: skip
    manifest = write_manifest(tmp_path / "jobs.yaml", "api-job", s3_bucket, tiny_model_dir, concepts)
    env = ray_head.env

    result = oneword("submit", str(manifest), "--address", ray_head.jobs_api, "--watch", env=env)
    assert result.returncode == 1, result.stderr  # one concept failed
    # what the job did, as Ray's metrics agent exports it (labelled by job id, never by concept)
    # (the driver's gauges are readable for two report intervals after it ends: read them at once)
    expected = {
        f"ray_oneword_job_concepts{{job=api-job,state={state}}}": number
        for state, number in {"pending": 0, "running": 0, "published": 2, "skipped": 0, "failed": 1}.items()
    }
    expected |= {"ray_oneword_train_steps_total{job=api-job}": 2 * 20,
                 "ray_oneword_train_loss_count{job=api-job}": 2 * 20 / DEFAULTS["log_interval"],
                 "ray_oneword_checkpoint_seconds_count{job=api-job}": 2 * 20 / 10,  # checkpoint_interval 10
                 "ray_oneword_publish_seconds_count{job=api-job}": 2}  # fmt: skip
    exported = until(ray_head.metrics, lambda now: all(now.get(k) == v for k, v in expected.items()))
    assert {key: exported.get(key) for key in expected} == expected
    assert exported["ray_oneword_registry_operation_seconds_count{backend=s3,operation=publish}"] >= 2
    status = status_of(manifest, env)
    assert status["state"] == "failed"
    states = {name: entry["state"] for name, entry in status["concepts"].items()}
    assert states == {"star-a": "published", "star-b": "published", "broken": "failed"}
    assert (
        "no such folder" in status["concepts"]["broken"]["error"] and "missing" in status["concepts"]["broken"]["error"]
    )

    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    registry = Registry.open(f"s3://{s3_bucket}/registry")
    a, b = (registry.get(name) for name in ("star-a", "star-b"))
    assert a[0].job_id == b[0].job_id == "api-job" and a[0].steps == 20 and a[0].metrics["final_loss"] > 0
    assert a[0].base_model == load_base_model(tiny_model_dir, "cpu").identity  # checked by every consumer
    expected = reference_vectors(tiny_model_dir, star_dir, 20)
    assert torch.equal(a[1].vectors, expected) and torch.equal(b[1].vectors, expected)  # Ray run == local engine
    side = load_base_model(tiny_model_dir, "cpu").resolution
    for name in ("star-a", "star-b"):  # each with the preview its worker rendered
        assert Image.open(io.BytesIO(registry.preview(name)[1])).size == (side, side)

    again = oneword("submit", str(manifest), "--address", ray_head.jobs_api, "--watch", env=env)
    assert again.returncode == 1
    status = status_of(manifest, env)
    assert {n: e["state"] for n, e in status["concepts"].items()} == {"star-a": "skipped", "star-b": "skipped",
                                                                      "broken": "failed"}  # fmt: skip
    assert status["concepts"]["star-a"]["version"] == a[0].version
    assert registry.versions("star-a") == [a[0].version]  # nothing retrained or republished


def controller_pid() -> int:
    """The pid of the newest Ray Train controller actor on this machine."""
    found = subprocess.run(["pgrep", "-n", "-f", "ray::TrainController"], capture_output=True, text=True)
    assert found.returncode == 0, "no TrainController process"
    return int(found.stdout.split()[0])


def test_killed_train_worker_and_controller_resume_from_their_checkpoint_bit_identically(
    ray_head, s3_bucket, tiny_model_dir, star_dir, tmp_path
):
    steps, interval = 80, 20
    concepts = [{"name": "sturdy", "images": str(star_dir), "init_word": "shape"}]
    manifest = write_manifest(tmp_path / "jobs.yaml", "kill-worker", s3_bucket, tiny_model_dir, concepts,
                              checkpoint_interval=interval, defaults={**DEFAULTS, "steps": steps})  # fmt: skip
    env = ray_head.env
    submitted = oneword("submit", str(manifest), "--address", ray_head.jobs_api, env=env)
    assert submitted.returncode == 0, submitted.stderr

    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    spec = load_job_spec(manifest)
    storage = job_storage(spec)

    progress = wait_for_step(manifest, "sturdy", interval + 5)
    killed_at = progress["step"]
    os.kill(progress["pid"], signal.SIGKILL)  # the Train worker process, mid-training

    # then the run's Train controller (FailureConfig does not cover it; the job fits the run again)
    def past_the_next_checkpoint() -> dict | None:
        p = read_json(storage, progress_key(spec.job, "sturdy"))
        return p if p and p["attempt"] == 2 and p["step"] >= 2 * interval + 5 else None

    restarted = wait_for(past_the_next_checkpoint, 400, "the restarted worker to pass a checkpoint", interval=0.2)
    os.kill(controller_pid(), signal.SIGKILL)

    final = wait_for_end(manifest, env)
    entry = final["concepts"]["sturdy"]
    assert final["state"] == "succeeded" and entry["state"] == "published" and entry["attempts"] == 3, entry
    after = read_json(storage, progress_key(spec.job, "sturdy"))
    assert after["attempt"] == 3 and after["resumed_from"] <= restarted["step"] + 5
    # each kill lost at most one checkpoint interval (plus the steps since the progress record read)
    assert restarted["resumed_from"] <= killed_at and killed_at - restarted["resumed_from"] <= interval + 5
    assert restarted["step"] - after["resumed_from"] <= interval + 5
    # however often it was killed, no more checkpoints than keep_checkpoints stay
    assert len(checkpoint_keys(storage, spec.job, concept_run("sturdy"))) <= spec.keep_checkpoints
    _, learned = Registry.open(f"s3://{s3_bucket}/registry").get("sturdy")
    assert torch.equal(learned.vectors, reference_vectors(tiny_model_dir, star_dir, steps))


SLOW = 400  # steps of a concept the test cancels mid-training: 10-20 s of margin for the cancel


def test_cancelled_driver_then_resubmit_skips_finished_and_resumes_unfinished(
    ray_head, s3_bucket, tiny_model_dir, star_dir, tmp_path
):
    # long enough to be cancelled mid-training: checkpoints no longer wait for Ray Train's polls
    concepts = [
        {"name": "quick", "images": str(star_dir), "init_word": "shape", "overrides": {"steps": 10}},
        {"name": "slow", "images": str(star_dir), "init_word": "shape", "overrides": {"steps": SLOW}},
    ]
    manifest = write_manifest(tmp_path / "jobs.yaml", "resubmit", s3_bucket, tiny_model_dir, concepts,
                              max_concurrent=1, checkpoint_interval=10)  # fmt: skip
    env = ray_head.env
    assert oneword("submit", str(manifest), "--address", ray_head.jobs_api, env=env).returncode == 0
    os.environ.update({k: v for k, v in env.items() if k.startswith("ONEWORD_S3_")})
    spec = load_job_spec(manifest)
    storage = job_storage(spec)

    wait_for_step(manifest, "slow", 25)  # past two checkpoints
    quick_version = status_of(manifest, env)["concepts"]["quick"]["version"]
    cancelled = oneword("cancel", str(manifest), "--address", ray_head.jobs_api, env=env)
    assert cancelled.returncode == 0 and "checkpoints are kept" in cancelled.stdout

    resumed = oneword("submit", str(manifest), "--address", ray_head.jobs_api, "--watch", env=env)
    assert resumed.returncode == 0, resumed.stderr
    status = status_of(manifest, env)
    assert status["concepts"]["quick"]["state"] == "skipped" and status["concepts"]["quick"]["version"] == quick_version
    assert status["concepts"]["slow"]["state"] == "published"
    progress = read_json(storage, progress_key(spec.job, "slow"))
    assert progress["resumed_from"] >= 20  # continued from a checkpoint of the cancelled run
    # the new run's records, told apart from the cancelled run's: attempts count again from 1
    assert progress["token"] == status["run_token"] and progress["attempt"] == 1
    assert status["counts"] == {"pending": 0, "running": 0, "published": 1, "skipped": 1, "failed": 0}
    detail = json.loads(oneword("status", str(manifest), "--concept", "slow", env=env).stdout)
    assert detail["state"] == "published" and detail["progress"]["step"] == SLOW
    unknown = oneword("status", str(manifest), "--concept", "nobody", env=env)
    assert unknown.returncode == 2 and "no concept 'nobody'" in unknown.stderr
    registry = Registry.open(f"s3://{s3_bucket}/registry")
    assert len(registry.versions("slow")) == 1  # the cancelled run's processes did not publish it too
    # that a resumed run is bit-identical to an uninterrupted one, the tests above and
    # test_chaos.py (which kills and resubmits drivers) check against in-process runs


def test_job_without_address_runs_in_this_process_with_folders(ray_head, tiny_model_dir, star_dir, tmp_path):
    """The single-developer default: no cluster address, no object store."""
    spec = {"job": "local-job", "base_model": str(tiny_model_dir), "registry": str(tmp_path / "registry"),
            "checkpoint_storage": str(tmp_path / "checkpoints"), "defaults": {**DEFAULTS, "steps": 10},
            "checkpoint_interval": 5, "resources": {"cpu": 0.5}, "log_format": "json",
            "concepts": [{"name": "local-star", "images": str(star_dir), "init_word": "shape"}]}  # fmt: skip
    manifest = tmp_path / "jobs.yaml"
    manifest.write_text(yaml.safe_dump(spec))
    result = oneword("submit", str(manifest), env=ray_head.env)
    assert result.returncode == 0, result.stderr
    assert "local-star" in result.stdout and "job local-job: 1 published, 0 skipped, 0 failed" in result.stdout
    # log_format json: the driver's log lines are JSON objects naming the job and the concept
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    [published] = [line for line in lines if line["message"] == "published"]
    assert (published["job"], published["concept"], published["attempts"]) == ("local-job", "local-star", 1)
    assert published["version"] and published["time"].endswith("+00:00")
    _, learned = Registry.open(str(tmp_path / "registry")).get("local-star")
    assert torch.equal(learned.vectors, reference_vectors(tiny_model_dir, star_dir, 10))
    assert (tmp_path / "checkpoints" / "local-job--local-star").is_dir()  # Ray Train's run folder
    status = json.loads(oneword("status", str(manifest), "--json", env=ray_head.env).stdout)
    assert status["state"] == "succeeded" and status["submission_id"].startswith("local-local-job-")


def test_job_via_ray_client_and_its_watcher_wait_out_an_s3_outage(ray_head, s3_server, s3_bucket, tiny_model_dir,
                                                                   star_dir, tmp_path):  # fmt: skip
    """A Ray Client submission (its driver runs in the cluster) watched from this machine, while the
    object store disappears mid-training for longer than the S3 client's retries: the job and the
    watcher wait it out, and the concept is what an uninterrupted run learns."""
    steps = 80
    concepts = [{"name": "patient", "images": str(star_dir), "init_word": "shape"}]
    manifest = write_manifest(tmp_path / "jobs.yaml", "client-job", s3_bucket, tiny_model_dir, concepts,
                              defaults={**DEFAULTS, "steps": steps}, max_failures=5, previews=False)  # fmt: skip
    command = [sys.executable, "-m", "pipeline.cli", "submit", str(manifest), "--address", ray_head.client, "--watch"]
    log = tmp_path / "watch.log"  # a file, not a pipe nobody reads until the end
    with log.open("w") as out, subprocess.Popen(command, env=ray_head.env, stdout=out, stderr=out) as watch:
        os.environ.update({k: v for k, v in ray_head.env.items() if k.startswith("ONEWORD_S3_")})
        wait_for_step(manifest, "patient", 15)
        s3_server.stop_gateway()
        time.sleep(20)
        s3_server.start_gateway()
        watch.wait(timeout=600)
    stderr = log.read_text()
    assert watch.returncode == 0, stderr
    assert "trying again" in stderr  # the watcher said it was waiting
    assert status_of(manifest, ray_head.env)["state"] == "succeeded"
    manifest_entry, learned = Registry.open(f"s3://{s3_bucket}/registry").get("patient")
    assert manifest_entry.job_id == "client-job" and manifest_entry.preview_sha256 is None  # previews: false
    assert torch.equal(learned.vectors, reference_vectors(tiny_model_dir, star_dir, steps))


def test_jobs_api_needs_the_cluster_token_and_never_prints_it(ray_head, s3_bucket, tiny_model_dir, star_dir,
                                                              tmp_path):  # fmt: skip
    concepts = [{"name": "guarded", "images": str(star_dir), "init_word": "shape"}]
    manifest = write_manifest(tmp_path / "jobs.yaml", "token-job", s3_bucket, tiny_model_dir, concepts)
    token = Path(ray_head.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    base = {k: v for k, v in ray_head.env.items() if not k.startswith("RAY_AUTH")}
    no_token = {**base, "HOME": str(tmp_path)}  # no ~/.ray/auth_token either
    wrong = {**base, "RAY_AUTH_TOKEN": "not-the-token"}
    for env, message in ((no_token, "requires a token (token source: none found"),
                         (wrong, "refused the token (token source: RAY_AUTH_TOKEN)")):  # fmt: skip
        result = oneword("submit", str(manifest), "--address", ray_head.jobs_api, env=env)
        assert result.returncode == 1 and message in result.stderr, result.stderr
        assert token not in result.stderr + result.stdout and "not-the-token" not in result.stderr
    assert status_of(manifest, ray_head.env)["state"] == "not started"  # nothing was recorded or run


# --- the manifest ---------------------------------------------------------------------------------

GOOD = """\
job: pets
base_model: shapesworld
registry: s3://concepts/prod
checkpoint_storage: s3://ckpt/oneword
concepts:
  - name: my-dog
    images: s3://photos/dog/
    init_word: dog
  - name: my-cat
    images: ./cats
    init_word: cat
    overrides:
      steps: 0
"""


def test_status_is_one_read_shows_a_silent_driver_as_stale_and_only_this_runs_progress(tiny_model_dir, tmp_path):
    from datetime import UTC, datetime, timedelta

    from pipeline.jobs.submission import format_status, read_concept, read_status
    from pipeline.store.job_records import DRIVER_SILENT_S, status_key

    concepts = [{"name": name, "images": "i", "init_word": "shape"} for name in ("a", "b")]
    manifest = {"job": "j", "base_model": str(tiny_model_dir), "registry": "r",
                "checkpoint_storage": str(tmp_path / "c"), "concepts": concepts}  # fmt: skip
    spec = parse_job_spec(yaml.safe_dump(manifest))
    storage = job_storage(spec)
    written = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    status = {"job": "j", "state": "running", "submission_id": "oneword-j-1", "run_token": "new",
              "updated_at": written.isoformat(), "counts": {"pending": 1, "running": 1},
              "concepts": {"a": {"state": "running", "step": 5, "steps": 60}, "b": {"state": "pending"}}}  # fmt: skip
    storage.put(status_key("j"), json.dumps(status).encode())
    storage.put(progress_key("j", "a"), json.dumps({"token": "new", "step": 6, "attempt": 1}).encode())
    storage.put(progress_key("j", "b"), json.dumps({"token": "old", "step": 60, "attempt": 3}).encode())

    fresh = read_status(spec, now=written + timedelta(seconds=10))
    assert fresh["state"] == "running" and fresh["concepts"]["b"] == {"state": "pending"}  # not the old 60/60
    assert "[1 pending, 1 running]" in format_status(fresh)
    silent = read_status(spec, now=written + timedelta(seconds=DRIVER_SILENT_S + 30))
    assert silent["state"] == "stale" and silent["silent_seconds"] == DRIVER_SILENT_S + 30
    assert "oneword-j-1" in silent["error"] and "submit the manifest again" in silent["error"]
    assert read_concept(spec, "a")["progress"]["step"] == 6  # this run's record
    assert "progress" not in read_concept(spec, "b")  # an earlier run's record is not shown
    # the command as users run it reads the same, and loads neither torch nor the diffusion libraries
    (tmp_path / "jobs.yaml").write_text(yaml.safe_dump(manifest))
    probe = (
        "import json, sys; from pipeline.cli.main import main; main(['status', sys.argv[1], '--json']); "
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers', 'ray') if m in sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "jobs.yaml")], capture_output=True, text=True)
    shown, loaded = result.stdout.strip().rsplit("\n", 1)
    assert result.returncode == 0 and json.loads(shown)["concepts"]["a"]["step"] == 5, result.stderr
    assert json.loads(loaded) == [], loaded


def test_checkpoints_keep_the_newest_and_resume_from_the_newest_that_loads(s3_env, s3_bucket, tmp_path):
    from pipeline.store.storage import LocalStorage, open_storage

    for storage in (LocalStorage(tmp_path / "c"), open_storage(f"s3://{s3_bucket}/ckpt-test")):
        for step in (10, 20, 30):
            write_checkpoint(storage, "j", "concepts/a", step, {"step": step, "v": torch.full((2,), float(step))}, 2)
        keys = checkpoint_keys(storage, "j", "concepts/a")
        assert [k.rsplit("/", 1)[1] for k in keys] == ["0000000020.pt", "0000000030.pt"]  # the oldest deleted
        assert newest_checkpoint(storage, "j", "concepts/a")["step"] == 30
        storage.put(keys[-1], b"torn")  # a newest one that does not load: the one before it is used
        state = newest_checkpoint(storage, "j", "concepts/a")
        assert state["step"] == 20 and torch.equal(state["v"], torch.full((2,), 20.0))
        assert newest_checkpoint(storage, "j", "concepts/b") is None


def test_manifest_errors_name_file_line_and_field():
    cases = {
        GOOD: "jobs.yaml:13: concepts.1.overrides.steps: Input should be greater than or equal to 1 (concept 'my-cat')",
        GOOD.replace("name: my-dog", "name: ../dog"): "jobs.yaml:6: concepts.0.name: invalid concept name '../dog'",
        GOOD.replace("init_word: cat", "init_wrd: cat"): "jobs.yaml:11: concepts.1.init_wrd: Extra inputs",
        GOOD.replace("job: pets", "job: Pets!"): "jobs.yaml:1: job: invalid job id 'Pets!'",
        GOOD.replace("name: my-cat", "name: my-dog"): "jobs.yaml:9: concepts.1.name: concept 'my-dog' appears twice",
        GOOD + "resources: {gpu: 1.5}\n": "jobs.yaml:14: resources.gpu: more than one GPU must be a whole number",
        GOOD + "defaults: {lr: 3}\n": "jobs.yaml:14: defaults.lr: Extra inputs are not permitted\n",
        GOOD + "defaults: {recipe: shapesworld}\n": "jobs.yaml:14: defaults.recipe: recipes are chosen before",
        GOOD + "checkpoint_interval: 50\ndefaults:\n  checkpoint_interval: 20\n": "jobs.yaml:16: "
        "defaults.checkpoint_interval: 20 would be replaced by the job's checkpoint_interval: 50",
    }
    for text, message in cases.items():
        with pytest.raises(ConfigError) as info:
            parse_job_spec(text, "jobs.yaml")
        assert message in str(info.value) + "\n", str(info.value)
    spec = parse_job_spec(GOOD.replace("steps: 0", "steps: 30"), "jobs.yaml")
    assert spec.config_for(spec.concepts[1]).steps == 30 and spec.config_for(spec.concepts[0]).init_word == "dog"
    assert spec.run_name("my-dog") == "pets--my-dog" and spec.resources.gpu == 0


def test_concept_images_from_an_s3_prefix(s3_server, s3_env, s3_settings, s3_bucket, star_dir, tmp_path):
    """A manifest's `images: s3://...` is downloaded for the worker and checked like a folder."""
    from pipeline.jobs.ray_train import _check_images, fetch_images
    from pipeline.store.storage import S3Storage

    storage = S3Storage(s3_bucket, "photos/star", s3_settings)
    for path in sorted(star_dir.iterdir()):
        storage.put(path.name, path.read_bytes())
    storage.put("notes.txt", b"not an image")
    folder = fetch_images(f"s3://{s3_bucket}/photos/star/", tmp_path / "fetched")
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in star_dir.iterdir())
    assert torch.equal(load_images(folder, 64), load_images(star_dir, 64))
    prefix = f"s3://{s3_bucket}"
    small = tmp_path / "small"  # under the bundled model's 32 px, which the worker would refuse
    small.mkdir()
    Image.new("RGB", (16, 24), "red").save(small / "a.png")
    concepts = [{"name": "good", "images": f"{prefix}/photos/star/", "init_word": "shape"},
                {"name": "empty", "images": f"{prefix}/nothing/", "init_word": "shape"},
                {"name": "small", "images": str(small), "init_word": "shape"},
                {"name": "small-ok", "images": str(small), "init_word": "shape",
                 "overrides": {"min_image_side": 16}}]  # fmt: skip
    spec = parse_job_spec(yaml.safe_dump({"job": "s3-images", "base_model": "shapesworld", "registry": "r",
                                          "checkpoint_storage": "c", "concepts": concepts}))  # fmt: skip
    assert _check_images(spec, "good") is None
    assert "no images" in _check_images(spec, "empty")
    assert "a.png: image is 16x24, smaller than the minimum side of 32 px" in _check_images(spec, "small")
    assert _check_images(spec, "small-ok") is None
    s3_server.stop_gateway()  # unreachable is not "bad images": it is raised, for the caller to wait out
    restart = threading.Timer(3, s3_server.start_gateway)
    try:
        with pytest.raises(StorageUnavailableError, match="cannot reach S3 endpoint"):
            _check_images(spec, "good")
        paused: list[float] = []  # what the jobs count in ray_oneword_storage_wait_seconds
        restart.start()  # the store comes back while the caller waits
        assert wait_out_outage(lambda: _check_images(spec, "good"), 120, lambda line: None, paused.append) is None
        assert len(paused) >= 2 and sum(paused) >= 2
    finally:
        restart.cancel()
        s3_server.start_gateway()  # a no-op if the timer already did


def test_ray_train_failures_from_an_unreachable_store_are_told_apart():
    """Ray Train's controller gives up on a failed write of its own state (a non-retryable
    ControllerError); train_one refits the run for those only. The real failure depends on the
    moment an outage starts, so this checks the classifier on Ray's own error type."""
    from ray.train import ControllerError

    from pipeline.jobs.ray_train import _is_storage_outage

    outage = OSError("When completing multiple part upload for key 'c/snapshot.json' in bucket 'b': AWS Error "
                     "NETWORK_CONNECTION during CompleteMultipartUpload operation: curlCode: 7")  # fmt: skip
    assert _is_storage_outage(ControllerError(outage))
    wrapped = RuntimeError("fit failed")
    wrapped.__cause__ = ControllerError(outage)
    assert _is_storage_outage(wrapped)
    assert not _is_storage_outage(ControllerError(ValueError("a bug in the controller")))
    assert not _is_storage_outage(RuntimeError("Training failed due to worker errors"))

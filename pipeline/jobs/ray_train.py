"""Bulk concept jobs on Ray Train: one ``TorchTrainer`` run per concept (or per pack), many at once.

    run_job(spec)                            the driver: up to max_concurrent concepts at a time
      └─ train_one (a Ray task per concept)  skip if this job already published it; check the
           │                                 images (a bad concept fails at once, without retries);
           │                                 fit(); publish the final vectors with the job's id
           └─ TorchTrainer(train_loop)       num_workers=1, the concept's GPU fraction / CPUs;
                                             RunConfig(name="<job>--<concept>", FailureConfig)

``train_loop`` drives the inversion engine, writes progress at every log interval and the
engine's full state as a checkpoint at every checkpoint interval (``pipeline.jobs.checkpoints``,
beside the job's other files: ``pipeline.jobs.job_files``), and after a restart starts from the
newest checkpoint that loads, so a killed worker costs at most one interval and the result is
bit-identical (on CPU) to an uninterrupted run. Because checkpoints are found by job and concept,
submitting the same manifest again resumes unfinished concepts from their checkpoints and skips
the ones already published for this job.

With ``pack_size`` K > 1 the unit is a pack instead (``pipeline.engine.packing``):

    run_job(spec)                            the driver: up to max_concurrent packs at a time
      └─ train_pack (a Ray task per pack)    fit(); then each concept's outcome as the worker wrote it
           └─ TorchTrainer(pack_loop)        one model, K slots training together; a slot that
                                             finishes publishes its concept and takes the next of
                                             the pack's queue; the pack's whole state is the
                                             checkpoint (run name "<job>--pack-<hash of its queue>")

The queues depend only on the manifest (``pack_queues``), so a resubmitted job finds its packs'
checkpoints; a concept this job already published is passed over when its turn for a slot comes.

Progress for ``oneword status`` lives next to the checkpoints. Workers write
``<job>/progress/<concept>.json`` (step, loss, ETA, attempt; a pack also its live slots in
``<job>/packs/<pack>.live.json``), each marked with the run's token. The driver keeps the
aggregate, ``<job>/status.json``: every concept's state, and the running ones' latest progress of
this run, rewritten every poll. It reads one progress object per running unit, so ``oneword
status`` reads one object whatever the job's size, and never shows an earlier run's progress.
"""

from __future__ import annotations

import hashlib
import math
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from pipeline.engine.data import IMAGE_SUFFIXES, load_images
from pipeline.errors import InputError, OnewordError
from pipeline.jobs import metrics
from pipeline.jobs.checkpoints import newest_checkpoint, write_checkpoint
from pipeline.jobs.job_files import concept_run, job_storage, pack_run, superseded
from pipeline.jobs.job_log import log
from pipeline.jobs.spec import JobSpec
from pipeline.store.job_records import (
    LIVE_FIELDS,
    outcome_key,
    pack_key,
    pack_live_key,
    preview_key,
    progress_key,
    read_json,
    status_key,
    write_json,
)
from pipeline.store.storage import (
    Result,
    S3Settings,
    StorageUnavailableError,
    open_storage,
    parse_s3_location,
    wait_out_outage,
)

if TYPE_CHECKING:
    from pipeline.engine.inversion import Inversion
    from pipeline.engine.model import BaseModel

# Environment every Ray process of a job gets: one thread per worker (many share a node) and
# pyarrow's S3 uploads in the form Ceph RGW and MinIO accept.
WORKER_ENV = {"OMP_NUM_THREADS": "1", "AWS_REQUEST_CHECKSUM_CALCULATION": "WHEN_REQUIRED"}


def train_storage(location: str, patience: float):
    """``RunConfig`` storage for a location: (storage_path, pyarrow filesystem or None).

    Ray Train's controller treats a failed write of its own state as fatal, so the filesystem's
    retries must outlast an outage of ``patience`` seconds. pyarrow's "default" AWS strategy
    doubles a 25 ms delay per attempt, without the "standard" strategy's retry quota (which a
    burst of failures during an outage uses up, leaving no retries at all).
    """
    if not location.startswith("s3://"):
        return str(Path(location).expanduser().absolute()), None
    import pyarrow.fs

    bucket, prefix = parse_s3_location(location)
    settings = S3Settings.from_env()
    access_key, secret_key = settings.credentials()
    filesystem = pyarrow.fs.S3FileSystem(
        endpoint_override=settings.endpoint,
        scheme="https" if settings.secure else "http",
        access_key=access_key,
        secret_key=secret_key,
        region=settings.region,
        retry_strategy=pyarrow.fs.AwsDefaultS3RetryStrategy(max_attempts=retry_attempts_for(patience)),
    )
    return f"{bucket}/{prefix}".rstrip("/"), filesystem


def retry_attempts_for(patience: float) -> int:
    """Attempts whose doubling delays (25 ms, 50 ms, ...) add up to at least ``patience`` seconds."""
    return max(3, math.ceil(math.log2(patience / 0.025 + 2)))


def fetch_images(location: str, dest: Path) -> Path:
    """A folder holding the concept's images: the folder itself, or a download of an S3 prefix."""
    if not location.startswith("s3://"):
        return Path(location).expanduser()
    storage = open_storage(location)
    for info in storage.list(""):
        if Path(info.key).suffix.lower() in IMAGE_SUFFIXES:
            storage.download(info.key, dest / info.key.replace("/", "__"))
    return dest


def load_concept_images(spec: JobSpec, name: str, resolution: int, min_side: int) -> torch.Tensor:
    """A concept's images, fetched and checked. ``InputError`` says what is wrong with them; an
    unreachable object store is raised as ``StorageUnavailableError``, to be waited out."""
    concept = next(c for c in spec.concepts if c.name == name)
    with tempfile.TemporaryDirectory() as tmp:
        folder = fetch_images(concept.images, Path(tmp))
        if not folder.exists():
            raise InputError(f"images: {concept.images}: no such folder")
        try:
            return load_images(folder, resolution, min_side)
        except StorageUnavailableError:
            raise
        except OnewordError as err:
            raise InputError(f"images: {err}") from None


def wait_for_storage(spec: JobSpec, call: Callable[[], Result], who: str = "") -> Result:
    """``call()`` through an object-store outage of up to the job's ``storage_patience``; each wait
    is printed and its seconds counted (``storage_wait_seconds``)."""
    return wait_out_outage(call, spec.storage_patience, lambda line: log(spec, line, who or None),
                           on_pause=lambda seconds: metrics.storage_wait.inc(seconds, job=spec.job))  # fmt: skip


class SupersededError(Exception):
    """A newer run of this job has taken over: this run's worker stops (and never publishes)."""


def stop_if_superseded(spec: JobSpec, token: str, who: str) -> None:
    """Asked at every checkpoint: a killed driver's workers can outlive it, and without this they
    would train on beside the resubmitted run (same checkpoints, twice the compute) until done."""
    if wait_for_storage(spec, lambda: superseded(spec, token), who):
        raise SupersededError("a newer run of this job took over: this run's worker stops")


# --- the worker: one concept's training loop ------------------------------------------------------


def train_loop(config: dict[str, Any]) -> None:
    """Runs on the Ray Train worker (see the module docstring)."""
    import ray.train

    from pipeline.engine.inversion import Inversion
    from pipeline.engine.model import load_base_model, resolve_dtype
    from pipeline.engine.training import Due, run_steps
    from pipeline.store.model_cache import local_model_source

    torch.set_num_threads(1)
    spec, token = JobSpec(**config["spec"]), config["token"]
    concept = next(c for c in spec.concepts if c.name == config["concept"])
    inversion_config = spec.config_for(concept)
    storage, key = job_storage(spec), progress_key(spec.job, concept.name)
    previous = wait_for_storage(spec, lambda: read_json(storage, key), concept.name) or {}
    # attempts of this run (a restarted worker); a resubmitted job's run starts again at 1
    attempt = int(previous.get("attempt", 0)) + 1 if previous.get("token") == token else 1

    device = ray.train.torch.get_device()
    dtype = resolve_dtype(inversion_config.precision, device)
    model = load_base_model(local_model_source(spec.base_model), device, dtype)
    resolution = inversion_config.resolution or model.resolution
    min_side = inversion_config.min_image_side
    images = wait_for_storage(spec, lambda: load_concept_images(spec, concept.name, resolution, min_side), concept.name)
    engine = Inversion(model, images, inversion_config, concept.name)
    run = concept_run(concept.name)
    state = wait_for_storage(spec, lambda: newest_checkpoint(storage, spec.job, run), concept.name)
    if state is not None:
        engine.load_state_dict(state)
    resumed_from = engine.step_count
    if state is not None or attempt > 1:
        metrics.restarts.inc(job=spec.job)
    started = time.time()
    first_step_at: float | None = None

    def progress(state: str, preview: bool = False) -> None:
        """Best effort: a progress line lost to a storage outage is rewritten at the next interval."""
        done = engine.step_count - resumed_from
        eta = (time.time() - started) / done * (inversion_config.steps - engine.step_count) if done else None
        record = {"concept": concept.name, "state": state, "step": engine.step_count,
                  "steps": inversion_config.steps, "loss": engine.last_loss, "eta_seconds": eta,
                  "attempt": attempt, "token": token, "resumed_from": resumed_from, "pid": os.getpid(),
                  "first_step_at": first_step_at, "updated_at": datetime.now(UTC).isoformat(),
                  "trained_at": time.time() if state == "trained" else None, "preview": preview}  # fmt: skip
        try:
            write_json(storage, key, record)
        except StorageUnavailableError as err:
            log(spec, f"progress not written: {err}", concept.name, step=engine.step_count)

    def checkpoint() -> None:
        """The engine's state on the job's storage (pipeline/jobs/checkpoints.py), waiting out an outage."""
        stop_if_superseded(spec, token, concept.name)
        writing = time.perf_counter()
        state = engine.state_dict()
        wait_for_storage(spec, lambda: write_checkpoint(storage, spec.job, run, engine.step_count, state,
                                                        spec.keep_checkpoints), concept.name)  # fmt: skip
        metrics.checkpoint_seconds.observe(time.perf_counter() - writing, job=spec.job)

    def after_step(engine: Inversion, due: Due) -> None:
        nonlocal first_step_at
        first_step_at = first_step_at or time.time()
        metrics.steps.inc(job=spec.job)
        if due.log:
            metrics.loss.observe(engine.last_loss, job=spec.job)
        if due.checkpoint:
            checkpoint()
        if due.log:
            progress("running")

    progress("running")
    try:
        run_steps(engine, after_step)  # the last step is always a checkpoint: the state the driver publishes
    except SupersededError as stop:
        log(spec, str(stop), concept.name, step=engine.step_count)
        return
    preview = spec.previews and wait_for_storage(spec, lambda: store_preview(spec, model, engine), concept.name)
    progress("trained", preview=preview)


def render_preview_of(spec: JobSpec, model: BaseModel, engine: Inversion) -> bytes | None:
    """A trained concept's preview image (``pipeline.engine.training.render_preview``), or None
    when rendering it fails: a preview is optional, the concept is not."""
    from pipeline.engine.generation import ImageGenerator
    from pipeline.engine.training import render_preview

    try:
        return render_preview(ImageGenerator(model), engine.name, engine.learned_vectors(), engine.config)
    except Exception as err:  # any failure to render leaves the concept without a preview
        log(spec, f"no preview: {_describe_failure(err)}", engine.name)
        return None


def store_preview(spec: JobSpec, model: BaseModel, engine: Inversion) -> bool:
    """Renders the preview and leaves it on the job's storage for the task that publishes."""
    png = render_preview_of(spec, model, engine)
    if png is not None:
        job_storage(spec).put(preview_key(spec.job, engine.name), png)
    return png is not None


# --- the per-concept task -------------------------------------------------------------------------


@dataclass
class ConceptOutcome:
    """One concept's line in the job summary."""

    name: str
    state: str  # published | skipped | failed
    version: str | None = None
    steps: int | None = None
    final_loss: float | None = None
    attempts: int = 0
    error: str | None = None
    seconds: float = 0.0
    to_first_step: float | None = None  # task start -> first training step (scheduling, loading), seconds
    to_published: float | None = None  # last step -> published in the registry, seconds


def _check_images(spec: JobSpec, name: str) -> str | None:
    """The reason a concept cannot train (missing or invalid images), or None. An unreachable
    object store is not a reason: it is raised, to be waited out. Images are held to the same
    minimum side as the training worker will hold them to, so no worker restart is spent on them."""
    from pipeline.store.model_cache import model_resolution

    config = spec.config_for(next(c for c in spec.concepts if c.name == name))
    try:
        min_side = config.min_image_side or config.resolution or model_resolution(spec.base_model)
        load_concept_images(spec, name, 8, min_side)
    except InputError as err:
        return str(err)
    return None


def train_one(spec_data: dict[str, Any], name: str, token: str) -> dict[str, Any]:
    """Learns and publishes one concept (a Ray task); never raises, returns its outcome. ``token``
    marks this run's progress records apart from an earlier run's."""
    from ray.train.torch import TorchTrainer

    from pipeline.engine.formats import LearnedConcept
    from pipeline.engine.inversion import Inversion
    from pipeline.engine.model import widths_of
    from pipeline.store.registry import Registry

    started = time.time()
    spec = JobSpec(**spec_data)
    concept = next(c for c in spec.concepts if c.name == name)
    outcome = ConceptOutcome(name=name, state="failed")

    def patiently(call: Callable[[], Result]) -> Result:
        return wait_for_storage(spec, call, name)

    try:
        registry = Registry.open(spec.registry)
        done = patiently(lambda: registry.find(name, job_id=spec.job))
        if done is not None:
            return asdict(ConceptOutcome(name, "skipped", done.version, done.steps, done.metrics.get("final_loss")))
        reason = patiently(lambda: _check_images(spec, name))
        if reason is not None:
            outcome.error = reason
            return asdict(outcome)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"spec": spec_data, "concept": name, "token": token},
            scaling_config=_scaling(spec),
            run_config=_run_config(spec, spec.run_name(name)),
        )
        _fit(spec, trainer, name, patiently)
        if patiently(lambda: superseded(spec, token)):
            outcome.error = "a newer run of this job took over; it publishes this concept"
            return asdict(outcome)
        state = patiently(lambda: newest_checkpoint(job_storage(spec), spec.job, concept_run(name)))
        if state is None or int(state["step"]) != spec.config_for(concept).steps:
            raise RuntimeError(f"the run ended without its final checkpoint (found step {state and state['step']})")
        progress = patiently(lambda: read_json(job_storage(spec), progress_key(spec.job, name))) or {}
        learned = LearnedConcept(
            name=name,
            vectors=Inversion.learned_vectors_of(state),
            base_model=state["identity"],  # the text encoder(s) the worker trained against
            widths=widths_of(state["identity"]),
            steps=int(state["step"]),
            final_loss=float(state["last_loss"]),
            config={**state["config"], "images": concept.images},
        )
        preview = None  # rendered by the worker; this run's only (a record of this run says it is there)
        if progress.get("preview") and progress.get("token") == token:
            preview = patiently(lambda: job_storage(spec).get(preview_key(spec.job, name)))
        publishing = time.perf_counter()
        manifest = patiently(lambda: registry.publish(learned, {"final_loss": learned.final_loss}, job_id=spec.job,
                                                      preview=preview))  # fmt: skip
        metrics.publish_seconds.observe(time.perf_counter() - publishing, job=spec.job)
        outcome = ConceptOutcome(name, "published", manifest.version, learned.steps, learned.final_loss,
                                 attempts=int(progress.get("attempt", 1)))  # fmt: skip
        if progress.get("first_step_at") and progress.get("trained_at"):
            outcome.to_first_step = round(progress["first_step_at"] - started, 2)
            outcome.to_published = round(time.time() - progress["trained_at"], 2)
    except Exception as err:  # one concept's failure never stops the others: it becomes its outcome
        outcome.error = _describe_failure(err)
    outcome.seconds = round(time.time() - started, 1)
    return asdict(outcome)


# --- packs: many concepts in one step (pack_size > 1) ----------------------------------------------


def pack_queues(spec: JobSpec) -> dict[str, list[str]]:
    """The job's concepts dealt into packs: ``{pack id: queue of concept names}``.

    Concepts whose settings change the step's tensor shapes (resolution, precision) never share a
    pack. Within such a group the concepts are dealt round-robin to as many packs as may run at
    once (``max_concurrent``), but no more than the group fills; each pack's slots then refill from
    its own queue. The split depends only on the manifest, and a pack's id on its queue, so a
    resubmitted job finds each pack's checkpoints (and a changed manifest never loads another's).
    """
    groups: dict[tuple[Any, ...], list[str]] = {}
    for concept in spec.concepts:
        config = spec.config_for(concept)
        groups.setdefault((config.resolution, config.precision), []).append(concept.name)
    queues: dict[str, list[str]] = {}
    for names in groups.values():
        count = min(spec.max_concurrent, math.ceil(len(names) / spec.pack_size))
        for i in range(count):
            queue = names[i::count]
            digest = hashlib.sha256(f"{spec.pack_size}:{','.join(queue)}".encode()).hexdigest()[:12]
            queues[f"pack-{digest}"] = queue
    return queues


def pack_loop(config: dict[str, Any]) -> None:
    """Runs on a pack's Ray Train worker: the pack's queue through ``K`` slots on one loaded model,
    publishing each concept as it finishes; its state after every due checkpoint (see the module
    docstring). Each concept's outcome is written to ``<job>/outcomes/<concept>.json``."""
    import ray.train

    from pipeline.engine.formats import LearnedConcept
    from pipeline.engine.model import load_base_model, resolve_dtype
    from pipeline.engine.packing import Pack, Request
    from pipeline.engine.training import Due
    from pipeline.store.model_cache import local_model_source
    from pipeline.store.registry import Registry

    torch.set_num_threads(1)
    spec, pack_id, queue, token = JobSpec(**config["spec"]), config["pack"], config["queue"], config["token"]
    configs = {c.name: spec.config_for(c) for c in spec.concepts if c.name in queue}
    images_of = {c.name: c.images for c in spec.concepts}
    storage, registry = job_storage(spec), Registry.open(spec.registry)

    def patiently(call: Callable[[], Result]) -> Result:
        return wait_for_storage(spec, call, pack_id)

    previous = patiently(lambda: read_json(storage, pack_key(spec.job, pack_id))) or {}
    restarted = previous.get("token") == token  # a restart of this submission's worker, not a resubmit
    attempt = int(previous.get("attempt", 0)) + 1 if restarted else 1
    patiently(lambda: write_json(storage, pack_key(spec.job, pack_id), {"token": token, "attempt": attempt}))

    first = configs[queue[0]]
    device = ray.train.torch.get_device()
    model = load_base_model(local_model_source(spec.base_model), device, resolve_dtype(first.precision, device))
    resolution = first.resolution or model.resolution

    def images(name: str) -> Callable[[], torch.Tensor]:
        return lambda: patiently(lambda: load_concept_images(spec, name, resolution, configs[name].min_image_side))

    pack = Pack(model, [Request(name, configs[name], images(name)) for name in queue], spec.pack_size)
    run = pack_run(pack_id)
    state = patiently(lambda: newest_checkpoint(storage, spec.job, run))
    if state is not None or attempt > 1:
        metrics.restarts.inc(job=spec.job)
    if state is not None:
        pack.load_state_dict(state, exact=restarted)
        running = ", ".join(f"{e.name} at step {e.step_count}" for e in pack.active()) or "no concept running"
        log(spec, f"resumed at queue position {pack.next}, {running}", pack_id, attempt=attempt)
    seen: dict[str, tuple[float, int]] = {}  # concept -> (time and step of its first step in this attempt)
    live: dict[str, Any] = {"token": token, "active": {}, "ended": {}}  # what the driver shows of this pack

    def write_live() -> None:
        """Best effort: the driver keeps showing the last one it read."""
        try:
            write_json(storage, pack_live_key(spec.job, pack_id), live)
        except StorageUnavailableError as err:
            log(spec, f"live progress not written: {err}", pack_id)

    def record(outcome: ConceptOutcome) -> None:
        value = {**asdict(outcome), "token": token}
        patiently(lambda: write_json(storage, outcome_key(spec.job, outcome.name), value))
        live["active"].pop(outcome.name, None)
        live["ended"][outcome.name] = outcome.state
        write_live()

    def progress(engine: Inversion, state: str) -> None:
        """Best effort, as for a single concept's run."""
        since, resumed_from = seen[engine.name]
        done, steps = engine.step_count - resumed_from, engine.config.steps
        eta = (time.time() - since) / done * (steps - engine.step_count) if done else None
        entry = {"concept": engine.name, "state": state, "step": engine.step_count, "steps": steps,
                  "loss": engine.last_loss, "eta_seconds": eta, "attempt": attempt, "token": token,
                  "resumed_from": resumed_from,
                  "pid": os.getpid(), "pack": pack_id, "slot": pack.slot_of(engine.name),
                  "first_step_at": since, "updated_at": datetime.now(UTC).isoformat(),
                  "trained_at": time.time() if state == "trained" else None}  # fmt: skip
        try:
            write_json(storage, progress_key(spec.job, engine.name), entry)
        except StorageUnavailableError as err:
            log(spec, f"progress not written: {err}", engine.name, step=engine.step_count, pack=pack_id)
        live["active"][engine.name] = entry
        write_live()

    def after_step(engine: Inversion, due: Due) -> None:
        if engine.name not in seen:
            seen[engine.name] = (time.time(), engine.step_count - 1)
        metrics.steps.inc(job=spec.job)
        if due.log:
            metrics.loss.observe(engine.last_loss, job=spec.job)
            progress(engine, "running")

    def skip(name: str) -> bool:
        done = patiently(lambda: registry.find(name, job_id=spec.job))
        if done is not None:
            record(ConceptOutcome(name, "skipped", done.version, done.steps, done.metrics.get("final_loss")))
        return done is not None

    def finished(engine: Inversion) -> None:
        trained_at = time.time()
        learned = LearnedConcept(
            name=engine.name,
            vectors=engine.learned_vectors(),
            base_model=model.identity,
            widths=model.concept_widths,
            steps=engine.step_count,
            final_loss=engine.last_loss,
            config={**engine.config.model_dump(mode="json"), "images": images_of[engine.name]},
            extra={"selected": engine.selected.as_dict()} if engine.selected else {},
        )
        if patiently(lambda: superseded(spec, token)):
            log(spec, "not published: a newer run of this job took over", engine.name)
            return
        # published already if the worker died after publishing and before the next checkpoint
        manifest = patiently(lambda: registry.find(engine.name, job_id=spec.job))
        if manifest is None:
            preview = render_preview_of(spec, model, engine) if spec.previews else None
            publishing = time.perf_counter()
            manifest = patiently(lambda: registry.publish(learned, {"final_loss": learned.final_loss},
                                                          job_id=spec.job, preview=preview))  # fmt: skip
            metrics.publish_seconds.observe(time.perf_counter() - publishing, job=spec.job)
        progress(engine, "trained")
        since = seen.get(engine.name, (trained_at, 0))[0]
        record(ConceptOutcome(engine.name, "published", manifest.version, learned.steps, learned.final_loss,
                              attempts=attempt, to_first_step=round(since - config["started"], 2),
                              to_published=round(time.time() - trained_at, 2)))  # fmt: skip

    def failed(name: str, reason: str) -> None:
        record(ConceptOutcome(name, "failed", error=reason, attempts=attempt))

    def save(state: dict[str, Any]) -> None:
        stop_if_superseded(spec, token, pack_id)
        writing = time.perf_counter()
        patiently(lambda: write_checkpoint(storage, spec.job, run, pack.steps_run, state, spec.keep_checkpoints))
        metrics.checkpoint_seconds.observe(time.perf_counter() - writing, job=spec.job)
        metrics.pack_occupancy.observe(len(pack.active()), job=spec.job)

    try:
        pack.run(finished=finished, failed=failed, after_step=after_step, checkpoint=save, skip=skip)
    except SupersededError as stop:
        log(spec, str(stop), pack_id, step=pack.steps_run)


def train_pack(spec_data: dict[str, Any], pack_id: str, queue: list[str], token: str) -> list[dict[str, Any]]:
    """Runs one pack (a Ray task); never raises, returns the outcome of every concept of its queue.
    ``token`` marks this run's outcome and progress records apart from an earlier run's."""
    from ray.train.torch import TorchTrainer

    started = time.time()
    spec = JobSpec(**spec_data)

    def patiently(call: Callable[[], Result]) -> Result:
        return wait_for_storage(spec, call, pack_id)

    error = None
    try:
        trainer = TorchTrainer(
            pack_loop,
            train_loop_config={"spec": spec_data, "pack": pack_id, "queue": queue, "token": token, "started": started},
            scaling_config=_scaling(spec),
            run_config=_run_config(spec, f"{spec.job}--{pack_id}"),
        )
        _fit(spec, trainer, pack_id, patiently)
    except Exception as err:  # the pack's run failed for good: its unfinished concepts fail with it
        error = _describe_failure(err)
    storage = job_storage(spec)
    outcomes = []
    for name in queue:
        written = patiently(lambda name=name: read_json(storage, outcome_key(spec.job, name))) or {}
        if written.pop("token", None) == token:
            outcomes.append(ConceptOutcome(**written))
        else:
            outcomes.append(ConceptOutcome(name, "failed", error=error or "the pack ended without training it"))
        outcomes[-1].seconds = round(time.time() - started, 1)
    return [asdict(outcome) for outcome in outcomes]


def _scaling(spec: JobSpec):
    """One worker with the manifest's resources (a GPU share only where the cluster has GPUs)."""
    import ray
    from ray.train import ScalingConfig

    use_gpu = spec.resources.gpu > 0 and ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": spec.resources.cpu, **({"GPU": spec.resources.gpu} if use_gpu else {})}
    return ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=resources)


def _run_config(spec: JobSpec, name: str):
    from ray.train import FailureConfig, RunConfig

    # the run's own state goes here; its checkpoints the worker writes itself (pipeline/jobs/checkpoints.py)
    storage_path, filesystem = train_storage(spec.checkpoint_storage, spec.storage_patience)
    return RunConfig(
        name=name,
        storage_path=storage_path,
        storage_filesystem=filesystem,
        failure_config=FailureConfig(max_failures=spec.max_failures),
    )


def _fit(spec: JobSpec, trainer, label: str, patiently: Callable[[Callable[[], Result]], Result]):
    """``trainer.fit()``, fitted again (resuming from its last checkpoint) when what failed was not
    the training but what runs it:

    - the run's ``TrainController`` actor died (killed, or its node lost). Ray Train's
      FailureConfig restarts workers, not the controller, whose death ``fit()`` raises as an actor
      error. Up to ``max_failures`` controller deaths are fitted again, as worker deaths are
      restarted (the new worker counts as the concept's next attempt);
    - an object-store outage: Ray Train's controller gives up on a failed write of its own state,
      whatever FailureConfig says. Wait for the store, then fit again.

    Fitting the same run again resumes it from its last checkpoint, as a resubmitted manifest would.
    """
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + spec.storage_patience
    controller_deaths = 0
    while True:
        try:
            return trainer.fit()
        except RayActorError as err:
            controller_deaths += 1
            if controller_deaths > spec.max_failures:
                raise ControllerDiedError(
                    f"the Ray Train controller of this run died {controller_deaths} times, more than "
                    f"max_failures ({spec.max_failures}); last: {_describe_failure(err)[:200]}"
                ) from None
            log(spec, f"the Ray Train controller died ({_describe_failure(err)[:200]}); resuming the run from its "
                "last checkpoint", label, failures=controller_deaths, max_failures=spec.max_failures)  # fmt: skip
        except Exception as err:
            if not _is_storage_outage(err) or time.monotonic() > deadline:
                raise
            log(spec, f"Ray Train lost the object store ({_describe_failure(err)[:200]}); resuming the run from "
                "its last checkpoint once the store answers", label)  # fmt: skip
            patiently(lambda: read_json(job_storage(spec), status_key(spec.job)))


class ControllerDiedError(OnewordError):
    """A run's Ray Train controller died more often than the job's ``max_failures`` allows."""


def _is_storage_outage(err: BaseException) -> bool:
    """Whether a Ray Train failure came from pyarrow's S3 client failing to connect."""
    seen: BaseException | None = err
    for _ in range(20):  # a chain of causes, never a cycle
        if seen is None:
            return False
        if "AWS Error NETWORK_CONNECTION" in str(seen):
            return True
        seen = getattr(seen, "controller_failure", None) or seen.__cause__ or seen.__context__
    return False


def _describe_failure(err: Exception) -> str:
    text = str(err).strip().splitlines()
    last = next((line for line in reversed(text) if line.strip()), type(err).__name__)
    return f"{type(err).__name__}: {last}"[:500]


# --- the driver -----------------------------------------------------------------------------------


@dataclass
class JobSummary:
    job: str
    outcomes: list[ConceptOutcome] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(o.state in ("published", "skipped") for o in self.outcomes)

    def table(self) -> str:
        lines = [f"{'concept':<24}{'state':<11}{'version':<32}{'steps':>7}{'loss':>9}{'attempts':>10}  error"]
        for o in self.outcomes:
            loss = f"{o.final_loss:.4f}" if o.final_loss is not None else ""
            lines.append(f"{o.name:<24}{o.state:<11}{o.version or '':<32}{o.steps or '':>7}{loss:>9}"
                         f"{o.attempts or '':>10}  {o.error or ''}".rstrip())  # fmt: skip
        counts = {s: sum(o.state == s for o in self.outcomes) for s in ("published", "skipped", "failed")}
        lines.append(f"job {self.job}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
        return "\n".join(lines)


# what a running concept's status entry shows of its latest progress record


def run_job(spec: JobSpec, submission_id: str | None = None, poll_seconds: float = 2.0) -> JobSummary:
    """Runs every concept of ``spec`` on the connected Ray cluster; returns when all have ended.

    Every poll it rewrites the job's status (``status_key``) from what it knows (pending, running,
    ended) and the running units' latest progress of this run: one read per running concept or
    pack, so a status read costs one object whatever the job's size."""
    import ray

    spec_data = spec.model_dump(mode="json")
    storage = job_storage(spec)
    token = uuid.uuid4().hex  # marks this run's progress and outcome records apart from an earlier run's
    # the units the driver schedules: one concept each, or one pack each (pack_size > 1), with the
    # object that holds its live progress
    if spec.pack_size > 1:
        task = ray.remote(num_cpus=0, max_retries=0)(train_pack)
        units = [(queue, pack_live_key(spec.job, pack_id),
                  lambda pack_id=pack_id, queue=queue: task.remote(spec_data, pack_id, queue, token))
                 for pack_id, queue in pack_queues(spec).items()]  # fmt: skip
    else:
        task = ray.remote(num_cpus=0, max_retries=0)(train_one)
        units = [([c.name], progress_key(spec.job, c.name), lambda name=c.name: task.remote(spec_data, name, token))
                 for c in spec.concepts]  # fmt: skip
    pending = [c.name for c in spec.concepts]
    running: dict[Any, tuple[list[str], str]] = {}  # task -> its concepts and its live progress key
    outcomes: dict[str, ConceptOutcome] = {}
    live: dict[str, dict[str, Any]] = {}  # running concept -> its latest progress of this run
    ended_in_pack: dict[str, str] = {}  # concept -> the state its pack reported before the pack ended
    started_at = datetime.now(UTC).isoformat()

    def refresh_live() -> None:
        for names, key in running.values():
            try:
                record = read_json(storage, key)
            except StorageUnavailableError:
                return  # shown as last read; the next poll tries again
            if not record or record.get("token") != token:
                continue  # nothing written by this run yet
            if spec.pack_size > 1:
                live.update(record["active"])
                ended_in_pack.update(record["ended"])
            elif record.get("state") == "running":
                live[names[0]] = record

    def write_status(state: str, must_land: bool = False) -> None:
        concepts = {name: {"state": "pending"} for name in pending}
        for names, _ in running.values():
            for name in names:
                entry = {"state": ended_in_pack.get(name, "running")}
                if entry["state"] == "running":
                    entry.update({k: live[name][k] for k in LIVE_FIELDS if k in live.get(name, {})})
                concepts[name] = entry
        concepts.update({name: asdict(o) for name, o in outcomes.items()})
        concepts = {c.name: concepts[c.name] for c in spec.concepts if c.name in concepts}  # manifest order
        counts = {s: 0 for s in ("pending", "running", "published", "skipped", "failed")}
        for entry in concepts.values():
            counts[entry["state"]] = counts.get(entry["state"], 0) + 1
        for counted, number in counts.items():
            metrics.concepts.set(number, job=spec.job, state=counted)
        now = datetime.now(UTC).isoformat()
        record = {"job": spec.job, "state": state, "submission_id": submission_id, "run_token": token,
                  "started_at": started_at, "updated_at": now, "pack_size": spec.pack_size, "counts": counts,
                  "concepts": concepts}  # fmt: skip
        if must_land or state != "running":  # the first and the final word must land
            wait_for_storage(spec, lambda: write_json(storage, status_key(spec.job), record), "status")
            return
        try:  # a running status lost to an outage is rewritten at the next poll
            write_json(storage, status_key(spec.job), record)
        except StorageUnavailableError as err:
            log(spec, f"status not written: {err}")

    write_status("running", must_land=True)  # the run's token is on storage before its tasks look for it
    while units or running:
        while units and len(running) < spec.max_concurrent:
            names, key, start = units.pop(0)
            running[start()] = (names, key)
            pending = [name for name in pending if name not in names]
        ready, _ = ray.wait(list(running), num_returns=1, timeout=poll_seconds)
        for ref in ready:
            names, _ = running.pop(ref)
            try:
                results = ray.get(ref)
                ended = [ConceptOutcome(**r) for r in (results if isinstance(results, list) else [results])]
            except Exception as err:  # the task itself died (its node was lost, say)
                ended = [ConceptOutcome(name, "failed", error=_describe_failure(err)) for name in names]
            for outcome in ended:
                outcomes[outcome.name] = outcome
                live.pop(outcome.name, None)
                log(spec, outcome.state, outcome.name, version=outcome.version, attempts=outcome.attempts or None,
                    error=outcome.error)  # fmt: skip
        refresh_live()
        write_status("running")
    summary = JobSummary(spec.job, [outcomes[c.name] for c in spec.concepts])
    write_status("succeeded" if summary.ok else "failed")
    return summary


def ray_init_for_job(address: str | None = None) -> None:
    """Connects this process to Ray (a cluster's, or an embedded local one) with the job's env."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_JOB_ID") or os.environ.get("RAY_ADDRESS"):  # a Jobs API entrypoint: env already set
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(address=address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)

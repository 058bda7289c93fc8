"""Getting a bulk job onto Ray, watching it, stopping it.

Three ways in, one driver (``pipeline.jobs.ray_train.run_job``):

- no address: an embedded local Ray instance in this process (the single-developer default);
- ``http://HEAD:8265``: the Ray Jobs API; the driver runs on the cluster as the entrypoint
  ``python -m pipeline.cli run-job spec.json`` (the manifest travels as the job's working_dir);
- ``ray://HEAD:10001``: Ray Client; the driver runs on the cluster as a detached actor named
  ``oneword-job-<job>``, so it outlives this client.

Credentials for object storage are never sent with the job: the cluster's processes read them
from their own environment (Kubernetes secrets), as this process does.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import InputError, OnewordError
from pipeline.jobs.job_files import job_storage
from pipeline.jobs.spec import JobSpec
from pipeline.store.job_records import progress_key, read_job_status, read_json, status_key
from pipeline.store.storage import wait_out_outage

if TYPE_CHECKING:
    from pipeline.jobs.ray_train import JobSummary

RAY_NAMESPACE = "oneword"
TERMINAL = {"succeeded", "failed", "stopped"}


class SubmissionError(OnewordError):
    """The cluster could not be reached or refused the job."""


def ray_auth_token() -> tuple[str | None, str]:
    """The Ray cluster token (Ray's own sources, in Ray's order) and where it came from.
    The token itself is never printed; messages name only its source."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path:
        try:
            token = Path(path).expanduser().read_text().strip()
        except OSError as err:
            raise InputError(f"RAY_AUTH_TOKEN_PATH {path}: cannot read the token file ({err.strerror})") from None
        if not token:
            raise InputError(f"RAY_AUTH_TOKEN_PATH {path}: the token file is empty")
        return token, f"the file {path} (RAY_AUTH_TOKEN_PATH)"
    default = Path("~/.ray/auth_token").expanduser()
    if default.is_file() and default.read_text().strip():
        return default.read_text().strip(), f"the file {default}"
    return None, "none found (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)"


def _jobs_client(address: str):
    """A Jobs API client that sends the cluster token, with auth failures as clear errors."""
    from ray.job_submission import JobSubmissionClient

    token, source = ray_auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        return JobSubmissionClient(address, headers=headers)
    except Exception as err:
        raise _submission_error(err, address, token, source) from None


def _submission_error(err: Exception, address: str, token: str | None, source: str) -> SubmissionError:
    text = str(err)
    if token:
        text = text.replace(token, "***")
    if type(err).__name__ == "AuthenticationError" or "Unauthorized" in text or "Forbidden" in text:
        verdict = "refused the token" if token else "requires a token"
        return SubmissionError(f"the Ray cluster at {address} {verdict} (token source: {source}); set "
                               "RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH to the cluster's token")  # fmt: skip
    first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)[:300]
    return SubmissionError(f"cannot use the Ray Jobs API at {address}: {first}")


def driver_actor_name(job: str) -> str:
    return f"oneword-job-{job}"


def run_local(spec: JobSpec) -> JobSummary:
    from pipeline.jobs.ray_train import ray_init_for_job, run_job

    submission_id = f"local-{spec.job}-{time.strftime('%Y%m%d-%H%M%S')}"
    mark_submitted(spec, submission_id)
    ray_init_for_job(None)
    return run_job(spec, submission_id=submission_id)


def mark_submitted(spec: JobSpec, submission_id: str) -> None:
    """Records a new submission before it starts, so that status never shows the previous run's end."""
    from datetime import datetime

    status = {"job": spec.job, "state": "submitted", "submission_id": submission_id,
              "updated_at": datetime.now(UTC).isoformat(),
              "concepts": {c.name: {"state": "pending"} for c in spec.concepts}}  # fmt: skip
    job_storage(spec).put(status_key(spec.job), json.dumps(status, indent=2).encode())


# How long a submission waits for a freshly started head's job agent.
AGENT_PATIENCE_S = 60.0


def submit_jobs_api(spec: JobSpec, address: str) -> str:
    """Submits the driver through the Jobs API; returns the submission id."""
    from pipeline.jobs.ray_train import WORKER_ENV  # torch and Ray Train: only where a job starts

    client = _jobs_client(address)  # fails early on a wrong address or token, before anything is recorded
    submission_id = f"oneword-{spec.job}-{time.strftime('%Y%m%d-%H%M%S')}"
    mark_submitted(spec, submission_id)
    with tempfile.TemporaryDirectory(prefix="oneword-job-") as folder:
        (Path(folder) / "spec.json").write_text(spec.model_dump_json(indent=2))
        deadline = time.monotonic() + AGENT_PATIENCE_S
        while True:
            try:
                client.submit_job(
                    entrypoint=f"python -m pipeline.cli run-job spec.json --submission-id {submission_id}",
                    submission_id=submission_id,
                    runtime_env={"working_dir": folder, "env_vars": WORKER_ENV},
                    metadata={"oneword_job": spec.job},
                )
                break
            except Exception as err:
                # a head that has just started answers 500 until its node's agent has registered
                if "No available agent" in str(err) and time.monotonic() < deadline:
                    time.sleep(2.0)
                    continue
                raise _submission_error(err, address, *ray_auth_token()) from None
    return submission_id


class _JobDriver:
    """The driver as a detached actor (Ray Client submissions)."""

    def run(self, spec_data: dict[str, Any]) -> None:
        import ray

        from pipeline.jobs.ray_train import run_job

        try:
            run_job(JobSpec(**spec_data), submission_id=f"actor:{driver_actor_name(spec_data['job'])}")
        finally:
            ray.actor.exit_actor()  # detached: nothing else would ever end it


def submit_ray_client(spec: JobSpec, address: str) -> str:
    """Starts the driver as a detached actor through Ray Client; returns the actor's name."""
    from pipeline.jobs.ray_train import WORKER_ENV

    token, _ = ray_auth_token()
    if token:  # Ray Client reads the token from its environment
        os.environ.setdefault("RAY_AUTH_MODE", "token")
        os.environ.setdefault("RAY_AUTH_TOKEN", token)
    import ray

    for attempt in range(3):  # the client server sometimes fails to fork its per-client server: retry
        try:
            ray.init(address=address, namespace=RAY_NAMESPACE, runtime_env={"env_vars": WORKER_ENV})
            break
        except Exception as err:
            with contextlib.suppress(Exception):
                ray.shutdown()
            if attempt == 2 or "Initialization failure from server" not in str(err):
                raise SubmissionError(f"cannot connect Ray Client to {address}: {_first_line(err)}") from None
            time.sleep(2 * (attempt + 1))
    name = driver_actor_name(spec.job)
    try:
        ray.get_actor(name)
        raise SubmissionError(f"job {spec.job} is already running on {address} (actor {name})")
    except ValueError:
        pass
    mark_submitted(spec, f"actor:{name}")
    actor = ray.remote(num_cpus=0)(_JobDriver).options(name=name, lifetime="detached").remote()
    actor.run.remote(spec.model_dump(mode="json"))
    return name


def cancel(spec: JobSpec, address: str) -> str:
    """Stops a running job's driver (and with it every training run it owns); checkpoints stay."""
    status = read_json(job_storage(spec), status_key(spec.job)) or {}
    submission = status.get("submission_id") or ""
    if address.startswith("ray://"):
        import ray

        ray.init(address=address, namespace=RAY_NAMESPACE)
        try:
            ray.kill(ray.get_actor(driver_actor_name(spec.job)))
        except ValueError:
            raise InputError(f"job {spec.job}: no running driver on {address}") from None
        return f"stopped driver actor {driver_actor_name(spec.job)}"
    if not submission or submission.startswith("actor:"):
        raise InputError(f"job {spec.job}: no Jobs API submission recorded in {spec.checkpoint_storage}")
    _jobs_client(address).stop_job(submission)
    return f"stopped submission {submission}"


def read_status(spec: JobSpec, now: datetime | None = None) -> dict[str, Any]:
    """The job's status as its driver last wrote it (``read_job_status``), or every concept
    pending before its driver's first word."""
    status = read_job_status(job_storage(spec), spec.job, now)
    if status is None:
        return {
            "job": spec.job,
            "state": "not started",
            "concepts": {c.name: {"state": "pending"} for c in spec.concepts},
        }
    return status


def read_concept(spec: JobSpec, name: str) -> dict[str, Any]:
    """One concept's detail on demand: its status entry, and its latest progress record when that
    belongs to the job's current run (two reads)."""
    if name not in {c.name for c in spec.concepts}:
        raise InputError(f"job {spec.job} has no concept {name!r}")
    status = read_status(spec)
    detail = {"job": spec.job, "concept": name, **status["concepts"].get(name, {"state": "pending"})}
    progress = read_json(job_storage(spec), progress_key(spec.job, name))
    if progress and progress.get("token") == status.get("run_token"):
        detail["progress"] = progress
    return detail


def format_status(status: dict[str, Any]) -> str:
    header = f"{'concept':<24}{'state':<11}{'step':>12}{'loss':>9}{'eta':>8}{'attempt':>9}  version / error"
    counts = ", ".join(f"{n} {state}" for state, n in (status.get("counts") or {}).items() if n)
    lines = [
        f"job {status['job']}: {status['state']}"
        + (f" [{counts}]" if counts else "")
        + (f" ({status['error']})" if status.get("error") else ""),
        header,
    ]
    for name, entry in status["concepts"].items():
        step = f"{entry.get('step', '')}/{entry.get('steps', '')}" if entry.get("steps") else ""
        loss = f"{entry['loss']:.4f}" if isinstance(entry.get("loss"), float) and entry["loss"] == entry["loss"] else ""
        eta = f"{entry['eta_seconds']:.0f}s" if entry.get("eta_seconds") and entry["state"] == "running" else ""
        detail = entry.get("version") or entry.get("error") or ""
        if entry["state"] == "running" and entry.get("pack"):
            where = f"slot {entry['slot']}" if entry.get("slot") is not None else "waiting for a slot"
            detail = f"{entry['pack']}, {where}"
        lines.append(f"{name:<24}{entry['state']:<11}{step:>12}{loss:>9}{eta:>8}{entry.get('attempt') or '':>9}  "
                     f"{detail}".rstrip())  # fmt: skip
    return "\n".join(lines)


def _driver_ended(address: str | None, submission_id: str | None) -> str | None:
    """For a Jobs API submission: why its driver ended, if it did (else None)."""
    if not address or not submission_id or not address.startswith("http"):
        return None
    from ray.job_submission import JobStatus

    client = _jobs_client(address)
    state = client.get_job_status(submission_id)
    if state not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.SUCCEEDED):
        return None
    logs = client.get_job_logs(submission_id).strip().splitlines()
    return f"driver {submission_id} {state.value.lower()}: {logs[-1] if logs else 'no output'}"


def watch(spec: JobSpec, interval: float = 2.0, address: str | None = None, submission_id: str | None = None
          ) -> dict[str, Any]:  # fmt: skip
    """Live progress bars, one per concept, until the job reaches a terminal state (or, for a
    Jobs API submission, until its driver ends without having finished the job). An unreachable
    object store is waited out as the job itself waits it out (the manifest's storage_patience)."""
    from tqdm import tqdm

    def read() -> dict[str, Any]:
        return wait_out_outage(lambda: read_status(spec), spec.storage_patience,
                               on_wait=lambda line: tqdm.write(f"oneword: {line}", file=sys.stderr))  # fmt: skip

    bars: dict[str, tqdm] = {}
    while True:
        status = read()
        if status["state"] not in TERMINAL and submission_id and status.get("submission_id") in (None, submission_id):
            ended = _driver_ended(address, submission_id)
            if ended is not None:
                status = read()  # the driver may have finished between the two reads
                if status["state"] not in TERMINAL:
                    status["state"], status["error"] = "failed", ended
                    for bar in bars.values():
                        bar.close()
                    return status
        for position, (name, entry) in enumerate(status["concepts"].items()):
            bar = bars.get(name)
            if bar is None:
                bar = bars[name] = tqdm(total=entry.get("steps") or 1, desc=f"{name:<20}", position=position,
                                        leave=True, dynamic_ncols=True)  # fmt: skip
            if entry.get("steps"):
                bar.total = entry["steps"]
            bar.n = entry.get("steps", 1) if entry["state"] in ("published", "skipped") else entry.get("step", 0)
            loss = entry.get("loss")
            bar.set_postfix_str(f"{entry['state']}" + (f" loss {loss:.4f}" if isinstance(loss, float) else ""))
            bar.refresh()
        if status["state"] in TERMINAL or status["state"] == "stale":
            for bar in bars.values():
                bar.close()
            return status
        time.sleep(interval)


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:300]


def status_json(status: dict[str, Any]) -> str:
    return json.dumps(status, indent=2, default=str)

"""A bulk job's files through its manifest: its storage, its runs' names, whether a run was
superseded. Where each record lies, and reading them, is ``pipeline.store.job_records``."""

from __future__ import annotations

from pipeline.jobs.spec import JobSpec
from pipeline.store.job_records import read_json, status_key
from pipeline.store.storage import Storage, open_storage


def job_storage(spec: JobSpec) -> Storage:
    return open_storage(spec.checkpoint_storage)


def concept_run(name: str) -> str:
    """A concept's run, under which its checkpoints lie (``pipeline.jobs.checkpoints``)."""
    return f"concepts/{name}"


def pack_run(pack_id: str) -> str:
    return f"packs/{pack_id}"


def superseded(spec: JobSpec, token: str) -> bool:
    """Whether another run of this job has taken over since the one of ``token`` started (its
    driver's status names another run): processes of a killed driver can outlive it for a while,
    and must not publish beside the resubmitted run."""
    return (read_json(job_storage(spec), status_key(spec.job)) or {}).get("run_token") != token

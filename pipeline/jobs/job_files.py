"""Where a bulk job keeps its files, beside its checkpoints (``checkpoint_storage``), and reading
and writing them. No torch and no Ray here: ``oneword status`` imports only this.

    <job>/status.json                 the driver's aggregate: every concept's state, running ones' progress
    <job>/progress/<concept>.json     a worker's latest progress (step, loss, ETA, attempt, run token)
    <job>/outcomes/<concept>.json     a packed concept's outcome, as its pack's worker wrote it
    <job>/packs/<pack>.json           a pack's run token and attempt; <pack>.live.json its live slots
    <job>/checkpoints/<run>/...       checkpoints of a concept's or a pack's run (pipeline.jobs.checkpoints)
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.jobs.spec import JobSpec
from pipeline.store.storage import ObjectNotFoundError, Storage, open_storage

# the fields of a progress record that the status aggregate carries for a running concept
LIVE_FIELDS = ("step", "steps", "loss", "eta_seconds", "attempt", "pack", "slot")


def job_storage(spec: JobSpec) -> Storage:
    return open_storage(spec.checkpoint_storage)


def write_json(storage: Storage, key: str, value: dict[str, Any]) -> None:
    storage.put(key, json.dumps(value, indent=2, default=str).encode())


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(key))
    except ObjectNotFoundError:
        return None


def progress_key(job: str, concept: str) -> str:
    return f"{job}/progress/{concept}.json"


def outcome_key(job: str, concept: str) -> str:
    return f"{job}/outcomes/{concept}.json"


def pack_key(job: str, pack: str) -> str:
    return f"{job}/packs/{pack}.json"


def pack_live_key(job: str, pack: str) -> str:
    return f"{job}/packs/{pack}.live.json"


def status_key(job: str) -> str:
    return f"{job}/status.json"


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

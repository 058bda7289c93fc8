"""What a bulk job keeps beside its checkpoints (its ``checkpoint_storage``): where each record
lies, and reading the job's status. No torch and no Ray here: ``oneword status`` and the
service's console read jobs through this module alone; ``pipeline.jobs`` writes them.

    <job>/status.json                 the driver's aggregate: every concept's state, running ones' progress
    <job>/progress/<concept>.json     a worker's latest progress (step, loss, ETA, attempt, run token)
    <job>/previews/<concept>.png      a trained concept's preview image, until the driver publishes it
    <job>/outcomes/<concept>.json     a packed concept's outcome, as its pack's worker wrote it
    <job>/packs/<pack>.json           a pack's run token and attempt; <pack>.live.json its live slots
    <job>/checkpoints/<run>/...       checkpoints of a concept's or a pack's run (pipeline.jobs.checkpoints)
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from pipeline.store.storage import ObjectNotFoundError, Storage

# the fields of a progress record that the status aggregate carries for a running concept
LIVE_FIELDS = ("step", "steps", "loss", "eta_seconds", "attempt", "pack", "slot")

# A running job's driver rewrites its status every poll (2 s); this long without a word, it is
# presumed gone (killed, or its node lost) and the status says so.
DRIVER_SILENT_S = 60.0

JOB_ID_RE = re.compile(r"[a-z0-9_-]{1,64}")
JOB_ID_RULE = "1-64 characters from a-z, 0-9, '-' and '_'"
STATUS_KEY_RE = re.compile(rf"({JOB_ID_RE.pattern})/status\.json")


def write_json(storage: Storage, key: str, value: dict[str, Any]) -> None:
    storage.put(key, json.dumps(value, indent=2, default=str).encode())


def read_json(storage: Storage, key: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.get(key))
    except ObjectNotFoundError:
        return None


def progress_key(job: str, concept: str) -> str:
    return f"{job}/progress/{concept}.json"


def preview_key(job: str, concept: str) -> str:
    return f"{job}/previews/{concept}.png"


def outcome_key(job: str, concept: str) -> str:
    return f"{job}/outcomes/{concept}.json"


def pack_key(job: str, pack: str) -> str:
    return f"{job}/packs/{pack}.json"


def pack_live_key(job: str, pack: str) -> str:
    return f"{job}/packs/{pack}.live.json"


def status_key(job: str) -> str:
    return f"{job}/status.json"


def read_job_status(storage: Storage, job: str, now: datetime | None = None) -> dict[str, Any] | None:
    """The job's status as its driver last wrote it (None before its first word): one read,
    whatever the job's size. A running job whose driver has been silent for ``DRIVER_SILENT_S``
    is shown as ``stale``."""
    status = read_json(storage, status_key(job))
    if status is not None and status["state"] == "running" and status.get("updated_at"):
        silent = ((now or datetime.now(UTC)) - datetime.fromisoformat(status["updated_at"])).total_seconds()
        if silent > DRIVER_SILENT_S:
            status["state"], status["silent_seconds"] = "stale", round(silent)
            driver = status.get("submission_id") or "this job"
            status["error"] = (f"no word from the driver of {driver} for {silent:.0f} s: it has stopped; submit "
                               "the manifest again to resume (finished concepts are skipped, unfinished ones "
                               "resume from their checkpoints)")  # fmt: skip
    return status


def job_names(storage: Storage) -> list[str]:
    """The jobs that have a status in ``storage``, sorted. (It lists every object there, the
    checkpoints too: meant for a storage location of jobs, not a whole bucket of other things.)"""
    return [m.group(1) for info in storage.list() if (m := STATUS_KEY_RE.fullmatch(info.key))]

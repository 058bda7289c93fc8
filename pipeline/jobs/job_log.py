"""A bulk job's log lines, as text or as JSON lines (the manifest's ``log_format``).

Text reads well in a terminal (``[job] concept: message``); JSON lines are what a platform's log
pipeline (Loki, Elasticsearch, Cloud Logging) indexes: every line an object with the time, the
job id, the concept (or pack) it is about, the message and any fields, so one concept's story
across driver and worker processes is one query.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.jobs.spec import JobSpec


def log_line(job: str, log_format: str, message: str, concept: str | None = None, **fields: Any) -> str:
    """One log line about ``job`` (and ``concept``, which may name a pack)."""
    if log_format == "json":
        record = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "job": job, "concept": concept,
                  "message": message, **fields}  # fmt: skip
        return json.dumps(record, default=str)
    about = f" {concept}:" if concept else ""
    extra = "".join(f" {key}={value}" for key, value in fields.items() if value is not None)
    return f"[{job}]{about} {message}{extra}"


def log(spec: JobSpec, message: str, concept: str | None = None, **fields: Any) -> None:
    """Prints one log line of ``spec``'s job (Ray collects every process's stdout into the job's logs)."""
    print(log_line(spec.job, spec.log_format, message, concept, **fields), flush=True)

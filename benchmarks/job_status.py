"""Status of a large bulk job: what `oneword status` costs at 2,000 concepts, against a real S3 server.

Starts a single-node Ceph RADOS Gateway on 127.0.0.1 (tests/ceph_rgw.py; `bash setup.sh --dev`
installs it) and lays out a job of ``--concepts`` concepts as a run leaves it mid-way: the
driver's status (some published, ``--running`` running, the rest pending) and every concept's
progress record. Then, with several repetitions each:

- baseline: the status read as it was before the driver kept the aggregate, the status object
  plus one progress read per concept;
- ``read_status``: what `oneword status` does now, one read;
- ``oneword status --json`` end to end, as a user runs it (a new Python process each time);
- the driver's bookkeeping per poll: one progress read per running concept and one status write.

    .venv/bin/python benchmarks/job_status.py --concepts 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from pipeline.jobs.job_files import job_storage
from pipeline.jobs.spec import load_job_spec
from pipeline.jobs.submission import read_status
from pipeline.store.job_records import LIVE_FIELDS, progress_key, read_json, status_key
from tests.ceph_rgw import s3_bucket_on_loopback


def timed(fn, repetitions: int) -> list[float]:
    out = []
    for _ in range(repetitions):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def lay_out(manifest: Path, concepts: int, running: int) -> None:
    """A job mid-way, as its driver and workers leave it on storage."""
    spec = load_job_spec(manifest)
    storage = job_storage(spec)
    now = datetime.now(UTC).isoformat()
    published = concepts // 2
    entries, progress = {}, {}
    for i, concept in enumerate(spec.concepts):
        record = {"concept": concept.name, "state": "running", "step": 40, "steps": 60, "loss": 0.1234,
                  "eta_seconds": 12.5, "attempt": 1, "token": "run", "updated_at": now}  # fmt: skip
        if i < published:
            entries[concept.name] = {"name": concept.name, "state": "published", "version": f"v{i:06d}",
                                     "steps": 60, "final_loss": 0.1, "attempts": 1, "seconds": 30.0}  # fmt: skip
            record.update(state="trained", step=60)
        elif i < published + running:
            entries[concept.name] = {"state": "running", **{k: record[k] for k in LIVE_FIELDS if k in record}}
        else:
            entries[concept.name] = {"state": "pending"}
        progress[concept.name] = record
    counts = {s: sum(e["state"] == s for e in entries.values()) for s in ("pending", "running", "published")}
    status = {"job": spec.job, "state": "running", "submission_id": "bench", "run_token": "run", "started_at": now,
              "updated_at": now, "pack_size": 1, "counts": counts, "concepts": entries}  # fmt: skip
    for name, record in progress.items():
        storage.put(progress_key(spec.job, name), json.dumps(record, indent=2).encode())
    storage.put(status_key(spec.job), json.dumps(status, indent=2).encode())


def baseline_status(manifest: Path) -> dict:
    """The status read before the aggregate: the driver's file, then every concept's progress."""
    spec = load_job_spec(manifest)
    storage = job_storage(spec)
    status = read_json(storage, status_key(spec.job))
    for name, entry in status["concepts"].items():
        record = read_json(storage, progress_key(spec.job, name)) or {}
        for key in ("step", "steps", "loss", "eta_seconds", "attempt"):
            if key in record and entry.get(key) is None:
                entry[key] = record[key]
    return status


def driver_poll(manifest: Path, running: int) -> None:
    """The driver's bookkeeping per poll: the running concepts' progress, then the status written."""
    spec = load_job_spec(manifest)
    storage = job_storage(spec)
    live = [read_json(storage, progress_key(spec.job, c.name)) for c in spec.concepts[:running]]
    status = read_json(storage, status_key(spec.job))  # stands in for the status the driver holds in memory
    assert len(live) == running
    storage.put(status_key(spec.job), json.dumps(status, indent=2).encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concepts", type=int, default=2000, help="concepts in the job (default 2000)")
    parser.add_argument("--running", type=int, default=16, help="concepts running at once (default 16)")
    parser.add_argument("--repetitions", type=int, default=5, help="repetitions per measurement (default 5)")
    args = parser.parse_args()

    with (
        tempfile.TemporaryDirectory(prefix="oneword-status-bench-") as tmp,
        s3_bucket_on_loopback(Path(tmp) / "rgw", "bench"),
    ):
        manifest = Path(tmp) / "jobs.yaml"
        concepts = [{"name": f"concept-{i:05d}", "images": "s3://bench/images/x/", "init_word": "dog"}
                    for i in range(args.concepts)]  # fmt: skip
        job = {"job": "big", "base_model": "shapesworld", "registry": str(Path(tmp) / "r"),
               "checkpoint_storage": "s3://bench/checkpoints", "concepts": concepts}  # fmt: skip
        manifest.write_text(yaml.safe_dump(job))
        lay_out(manifest, args.concepts, args.running)
        size = len(job_storage(load_job_spec(manifest)).get(status_key("big")))
        cli = [sys.executable, "-m", "pipeline.cli", "status", str(manifest), "--json"]

        def command() -> None:
            result = subprocess.run(cli, capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            assert len(json.loads(result.stdout)["concepts"]) == args.concepts

        rows = {
            f"baseline: status + {args.concepts} progress reads": timed(lambda: baseline_status(manifest),
                                                                        args.repetitions),
            "read_status (one read)": timed(lambda: read_status(load_job_spec(manifest)), args.repetitions * 4),
            "oneword status --json (new process)": timed(command, args.repetitions),
            f"driver per poll ({args.running} running)": timed(lambda: driver_poll(manifest, args.running),
                                                               args.repetitions * 4),
        }  # fmt: skip
    baseline = statistics.median(next(iter(rows.values())))
    print(f"{'measurement':<44}{'median s':>10}{'min s':>8}{'max s':>8}{'vs baseline':>13}")
    for label, samples in rows.items():
        median = statistics.median(samples)
        print(f"{label:<44}{median:>10.3f}{min(samples):>8.3f}{max(samples):>8.3f}{baseline / median:>12.1f}x")
    print(f"{args.concepts} concepts, status object {size / 1024:.0f} KiB; Ceph RGW on loopback; "
          f"{platform.machine()}, {len(os.sched_getaffinity(0))} cores, python {platform.python_version()}; "
          f"{datetime.now(UTC):%Y-%m-%d}")  # fmt: skip


if __name__ == "__main__":
    main()

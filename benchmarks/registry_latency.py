"""Registry latency: publish and get-latest, on the folder backend and on a real S3 server.

Starts a single-node Ceph RADOS Gateway on 127.0.0.1 (tests/ceph_rgw.py; `bash setup.sh --dev`
installs it), then for each backend times ``--ops`` publishes and ``--ops`` get-latest calls
(manifest listing + manifest + artifact + sha256 check) of an SD-1.5-sized concept (1 x 768),
for a name with 1 version and one with ``--versions`` versions, and pinned gets (no listing).
The baseline is one raw object GET of the same artifact on the same backend: the least any
registry read can cost.

    .venv/bin/python benchmarks/registry_latency.py --ops 200
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from pipeline.engine.formats import LearnedConcept
from pipeline.store.registry import ARTIFACT, Registry
from pipeline.store.storage import LocalStorage, S3Settings, S3Storage, Storage
from tests.ceph_rgw import CephRGW


def percentiles(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


def timed(fn, ops: int) -> list[float]:
    out = []
    for _ in range(ops):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def measure(storage: Storage, ops: int, versions: int) -> dict[str, list[float]]:
    registry = Registry(storage)

    def concept(name: str) -> LearnedConcept:
        return LearnedConcept(name, torch.randn(1, 768), base_model="clip-text:bench")

    registry.publish(concept("bench"))  # one version
    for _ in range(versions):
        registry.publish(concept("bench-many"))
    publishing = concept("bench-publish")
    results = {"publish": timed(lambda: registry.publish(publishing), ops)}
    latest = registry.manifest("bench")
    for _ in range(5):  # warm connections and caches alike for every read variant
        registry.get("bench")
    key = f"concepts/bench/{latest.version}/{ARTIFACT}"
    results["raw GET (baseline)"] = timed(lambda: storage.get(key), ops)
    results["get-latest"] = timed(lambda: registry.get("bench"), ops)
    results[f"get-latest, {versions} versions"] = timed(lambda: registry.get("bench-many"), ops)
    results["get pinned"] = timed(lambda: registry.get("bench", latest.version), ops)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", type=int, default=200, help="operations per measurement (default 200)")
    parser.add_argument("--versions", type=int, default=50, help="versions of the 'many' name (default 50)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="oneword-registry-bench-") as tmp:
        server = CephRGW(Path(tmp) / "rgw").start()
        try:
            settings = S3Settings.from_env(server.env)
            settings.client().make_bucket(bucket_name="bench")
            backends = {
                "folder": LocalStorage(Path(tmp) / "folder"),
                "s3 (Ceph RGW, loopback)": S3Storage("bench", "r", settings),
            }
            print(f"{'backend':<26}{'operation':<28}{'p50 ms':>9}{'p95 ms':>9}{'p50 / raw GET':>15}")
            for label, storage in backends.items():
                results = measure(storage, args.ops, args.versions)
                raw = percentiles(results["raw GET (baseline)"])[0]
                for op, samples in results.items():
                    p50, p95 = percentiles(samples)
                    print(f"{label:<26}{op:<28}{p50:>9.2f}{p95:>9.2f}{p50 / raw:>14.1f}x")
        finally:
            server.stop()
    print(f"{args.ops} operations each; {platform.machine()}, {len(os.sched_getaffinity(0))} cores, "
          f"python {platform.python_version()}")  # fmt: skip


if __name__ == "__main__":
    main()

"""The generation service under change and under load: a soak, then autoscaling, observed.

Starts a real S3 server (Ceph RGW, tests/ceph_rgw.py) holding the registry, a local Ray and the
generation service (tiny model, CPU) with autoscaling from 1 to ``--max-replicas`` replicas and
short delays, then:

1. **Soak** (``--seconds``): ``--concurrency`` clients send generations without pause, each prompt
   naming one of ``--concepts`` concepts, as ``<name>`` (latest) or pinned ``<name@version>``, or
   no concept; meanwhile a publisher, at random moments from a seeded generator, publishes new
   versions, deletes old (non-latest) versions and the clients pin what it published. Checked:
   - no 5xx other than 503 ``overloaded`` (the documented answer of a full replica), and no
     other status than 200, 404 (a pinned version deleted) or that 503;
   - every ``<name>`` answer started later than ``concept_ttl_s`` after a version was published
     uses that version or a newer one (staleness: how long after publication an older one was
     still served; at most the TTL);
   - latency p50/p99 of the 200s.
2. **Autoscaling**: the replica count, sampled every half second through the soak and then while
   the service is idle, until it is back to one replica.

Exits 1 when a check fails. Re-executes itself in a loopback-only network namespace.

    .venv/bin/python benchmarks/serving_soak.py --seconds 120
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netns import reexec_isolated

SIZE, STEPS, TTL = 32, 4, 2.0


@dataclass
class Answer:
    started: float  # monotonic seconds
    latency: float  # seconds
    status: int
    code: str  # the error code of a non-200 answer
    name: str | None  # the concept named, if any
    pinned: str | None  # the version asked for, if pinned
    served: str | None  # the version the service used


@dataclass
class History:
    """What the publisher did, in monotonic time; read by the clients under ``lock``."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    published: dict[str, list[tuple[float, str]]] = field(default_factory=dict)  # name -> [(time, version)]
    live: dict[str, list[str]] = field(default_factory=dict)  # name -> versions not deleted
    deletes: int = 0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=120, help="length of the soak")
    parser.add_argument("--concurrency", type=int, default=16, help="clients sending without pause")
    parser.add_argument("--concepts", type=int, default=6, help="concepts published, pinned and deleted")
    parser.add_argument("--max-replicas", type=int, default=2, help="most replicas autoscaling may start")
    parser.add_argument("--seed", type=int, default=0, help="seed of the publisher's and clients' choices")
    args = parser.parse_args()
    reexec_isolated([sys.executable, *sys.argv])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import httpx
    import ray
    import torch
    from ray import serve

    from pipeline.engine.formats import LearnedConcept
    from pipeline.engine.model import build_tiny_model, load_base_model
    from pipeline.store.registry import Registry
    from serving.app import build_app
    from tests.ceph_rgw import free_port, s3_bucket_on_loopback

    rng = random.Random(args.seed)
    history = History()
    names = [f"soak{i}" for i in range(args.concepts)]
    answers: list[Answer] = []
    replicas: list[tuple[float, int]] = []

    with tempfile.TemporaryDirectory(prefix="oneword-soak-") as tmp:
        workdir = Path(tmp)
        with s3_bucket_on_loopback(workdir / "rgw", "soak"):
            location = "s3://soak/registry"
            registry = Registry.open(location)
            model_dir = build_tiny_model(workdir / "tiny")
            model = load_base_model(model_dir, "cpu")
            seeds = iter(range(10**6))

            def publish(name: str) -> None:
                vectors = torch.randn(1, model.embedding_dim, generator=torch.Generator().manual_seed(next(seeds)))
                manifest = registry.publish(LearnedConcept(name, vectors, base_model=model.identity))
                with history.lock:
                    history.published.setdefault(name, []).append((time.monotonic(), manifest.version))
                    history.live.setdefault(name, []).append(manifest.version)

            def delete_old(name: str) -> None:
                with history.lock:
                    old = history.live[name][:-1]  # never the latest: "<name>" keeps a meaning
                    if not old:
                        return
                    version = rng.choice(old)
                    history.live[name].remove(version)
                    history.deletes += 1
                registry.delete(name, version)

            for name in names:
                publish(name)

            port = free_port()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = f"http://127.0.0.1:{port}"
            settings = {"base_model": str(model_dir), "registry": location, "concept_ttl_s": TTL,
                        "allow_anonymous": True,  # loopback only: no keys needed
                        "min_replicas": 1, "max_replicas": args.max_replicas, "target_ongoing_requests": 2,
                        "upscale_delay_s": 2, "downscale_delay_s": 10, "num_cpus": 0.5,
                        "max_ongoing_requests": 4, "max_queued_requests": 8, "max_batch_size": 4,
                        "min_size": 16, "max_size": 64}  # fmt: skip
            try:
                serve.run(build_app(settings), name="oneword", route_prefix="/")
            except RuntimeError:
                deployment = serve.status().applications["oneword"].deployments["oneword-generator"]
                raise SystemExit(f"the service did not start: {deployment.message}") from None
            stop = threading.Event()

            def count_replicas() -> None:
                while not stop.is_set():
                    deployment = serve.status().applications["oneword"].deployments["oneword-generator"]
                    replicas.append((time.monotonic(), deployment.replica_states.get("RUNNING", 0)))
                    time.sleep(0.5)

            def client(index: int) -> None:
                local = random.Random(args.seed * 1000 + index)
                with httpx.Client(timeout=120) as http:
                    while not stop.is_set():
                        name, pinned = local.choice([*names, None]), None
                        if name is not None and local.random() < 0.3:
                            with history.lock:  # pin any version the publisher made, deleted ones too
                                pinned = local.choice(history.published[name])[1]
                        prompt = f"a photo of <{name}{'@' + pinned if pinned else ''}>" if name else "a photo"
                        body = {"prompt": prompt, "seed": local.randrange(1000), "width": SIZE, "height": SIZE,
                                "steps": STEPS}  # fmt: skip
                        started = time.monotonic()
                        response = http.post(f"{base}/v1/generate", json=body)
                        latency = time.monotonic() - started
                        json_body = response.headers.get("content-type", "").startswith("application/json")
                        data = response.json() if json_body else {}  # Serve's own 503 is plain text
                        served = data.get("concepts", {}).get(name) if response.status_code == 200 else None
                        code = "" if response.status_code == 200 else data.get("code", "not-json")
                        answers.append(Answer(started, latency, response.status_code, code, name, pinned, served))
                        if response.status_code == 503:  # as a client should: wait as told
                            time.sleep(float(response.headers.get("Retry-After", "1")))

            sampler = threading.Thread(target=count_replicas, daemon=True)
            sampler.start()
            soak_start = time.monotonic()
            with ThreadPoolExecutor(args.concurrency) as pool:
                clients = [pool.submit(client, i) for i in range(args.concurrency)]
                while time.monotonic() - soak_start < args.seconds:
                    time.sleep(rng.uniform(0.5, 3.0))
                    name = rng.choice(names)
                    if rng.random() < 0.6:
                        publish(name)
                    else:
                        delete_old(name)
                stop.set()
                for future in clients:
                    future.result()
            soak_end = time.monotonic()
            # autoscaling: the count goes on being sampled while the service idles
            stop.clear()
            sampler = threading.Thread(target=count_replicas, daemon=True)
            sampler.start()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (replicas and replicas[-1][1] == 1):
                time.sleep(1)
            stop.set()
            sampler.join()
            serve.shutdown()
            ray.shutdown()

    failures = check(answers, history, names)
    ok = [a.latency * 1000 for a in answers if a.status == 200]
    statuses = {}
    for a in answers:
        key = f"{a.status} {a.code}".strip()
        statuses[key] = statuses.get(key, 0) + 1
    published = sum(len(v) for v in history.published.values()) - len(names)
    print(f"\nsoak: {args.seconds:g} s at concurrency {args.concurrency}, {len(answers)} requests: "
          f"{', '.join(f'{k}: {v}' for k, v in sorted(statuses.items()))}")  # fmt: skip
    print(f"changes meanwhile: {published} versions published, {history.deletes} old versions deleted; "
          f"concept_ttl_s {TTL:g}")  # fmt: skip
    overloaded = [a.started - soak_start for a in answers if a.status == 503]
    if overloaded:
        print(f"503 overloaded answers from {min(overloaded):.1f} s to {max(overloaded):.1f} s into the soak")
    print(f"latency of the 200s: p50 {statistics.median(ok):.0f} ms, p99 {percentile(ok, 0.99):.0f} ms")
    stale = staleness(answers, history)
    print(f"staleness: {stale:.2f} s at most (an older version served after a newer one was published)")
    peak = max(count for _, count in replicas)
    up = next((t - soak_start for t, count in replicas if count > 1), None)
    down = next((t - soak_end for t, count in replicas if t > soak_end and count == 1), None)
    print(f"autoscaling: peak {peak} replicas; first added {up:.1f} s into the soak" if up is not None
          else f"autoscaling: peak {peak} replicas (none added)")  # fmt: skip
    if down is not None:
        print(f"back to one replica {down:.1f} s after the load stopped")
    changes = [(round(t - soak_start, 1), count) for i, (t, count) in enumerate(replicas)
               if i == 0 or count != replicas[i - 1][1]]  # fmt: skip
    print(f"replica count over time (s since the soak began, replicas): {changes}")
    print(f"tiny model, {SIZE}px, {STEPS} steps; {platform.machine()}, {len(os.sched_getaffinity(0))} cores")
    for failure in failures:
        print(f"FAILED: {failure}")
    sys.exit(1 if failures else 0)


def check(answers: list[Answer], history: History, names: list[str]) -> list[str]:
    """The soak's promises, as failure messages."""
    failures = []
    for a in answers:
        allowed = a.status == 200 or (a.status == 503 and a.code == "overloaded")
        allowed = allowed or (a.status == 404 and a.pinned is not None and a.code == "concept_not_found")
        if not allowed:
            failures.append(f"answer {a.status} {a.code} for <{a.name}@{a.pinned}>")
        if a.status == 200 and a.pinned and a.served != a.pinned:
            failures.append(f"pinned <{a.name}@{a.pinned}> served version {a.served}")
        if a.status == 200 and a.name and not a.pinned:
            due = [v for t, v in history.published[a.name] if t + TTL + 0.5 < a.started]
            if due and a.served < due[-1]:  # versions sort by time
                failures.append(f"<{a.name}> served {a.served} though {due[-1]} was published more than the TTL before")
    return failures[:20]


def staleness(answers: list[Answer], history: History) -> float:
    """The longest a ``<name>`` request that started after a newer version's publication was still
    answered with an older one."""
    worst = 0.0
    for a in answers:
        if a.status == 200 and a.name and not a.pinned:
            newer = [t for t, v in history.published[a.name] if t < a.started and v > a.served]
            if newer:
                worst = max(worst, a.started - min(newer))
    return worst


if __name__ == "__main__":
    main()

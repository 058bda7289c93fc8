"""The generation service under load: throughput, latency, batching, concepts, Serve's overhead.

Starts a real S3 server (Ceph RGW, tests/ceph_rgw.py) holding the registry, a local Ray with
one generator replica (tiny model, CPU, 1 CPU), and measures over HTTP:

1. images/s and p50/p95 latency at concurrency 1, 4 and 16, batched (max_batch_size 8) and
   unbatched (max_batch_size 1);
2. a cached concept vs a plain prompt (concurrency 1, alternating): the per-request cost of concepts;
3. hot-loading: resolving a just-published concept from S3 (in the replica's cache code, timed
   in-process) vs a cached one;
4. mixed-concept batches (requests cycling through 16 concepts, each used once before) vs
   single-concept batches (one concept), concurrency 16, alternating repetitions: throughput ratio;
5. Serve's overhead: HTTP at concurrency 1 vs calling the pipeline directly in-process, one thread.

    .venv/bin/python benchmarks/serving_latency.py --requests 64

Re-executes itself in a loopback-only network namespace (Ray listens on every interface).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.netns import reexec_isolated

SIZE, STEPS = 32, 4


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def load(base: str, bodies: list[dict], concurrency: int) -> tuple[float, list[float]]:
    """Sends every body at the given concurrency; returns (images/s, latencies in ms)."""
    import httpx

    client = httpx.Client(timeout=300)

    def one(body: dict) -> float:
        started = time.perf_counter()
        response = client.post(f"{base}/v1/generate", json=body)
        if response.status_code != 200:
            raise SystemExit(f"HTTP {response.status_code}: {response.text[:300]}")
        return (time.perf_counter() - started) * 1000

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, bodies))
    return len(bodies) / (time.perf_counter() - started), latencies


def pairs(base: str, count: int) -> tuple[list[float], list[float]]:
    """``count`` pairs of a plain-prompt and a cached-concept request at concurrency 1, which one
    goes first alternating from pair to pair; latencies in ms."""
    import httpx

    plain, concept = [], []
    with httpx.Client(timeout=300) as client:
        for i in range(count):
            pair = [("a photo of a star", plain), ("a photo of <c0>", concept)]
            for prompt, into in pair if i % 2 == 0 else pair[::-1]:
                started = time.perf_counter()
                response = client.post(f"{base}/v1/generate", json=body(prompt, i))
                into.append((time.perf_counter() - started) * 1000)
                if response.status_code != 200:
                    raise SystemExit(f"HTTP {response.status_code}: {response.text[:300]}")
    return plain, concept


def body(prompt: str, seed: int) -> dict:
    return {"prompt": prompt, "seed": seed, "width": SIZE, "height": SIZE, "steps": STEPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=64, help="requests per load measurement")
    parser.add_argument("--pairs", type=int, default=120, help="plain/concept request pairs (concurrency 1)")
    parser.add_argument("--reps", type=int, default=7, help="repetitions of the single vs mixed batch runs")
    args = parser.parse_args()
    reexec_isolated([sys.executable, *sys.argv])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    import torch
    from ray import serve

    from pipeline.engine.formats import LearnedConcept
    from pipeline.engine.generation import ImageGenerator
    from pipeline.engine.model import build_tiny_model, load_base_model
    from pipeline.store.registry import Registry
    from serving.app import build_app
    from serving.concept_cache import ConceptCache
    from tests.ceph_rgw import free_port, s3_bucket_on_loopback

    with tempfile.TemporaryDirectory(prefix="oneword-serve-bench-") as tmp:
        workdir = Path(tmp)
        with s3_bucket_on_loopback(workdir / "rgw", "bench"):
            location = "s3://bench/registry"
            registry = Registry.open(location)
            model_dir = build_tiny_model(workdir / "tiny")
            model = load_base_model(model_dir, "cpu")
            dim = model.embedding_dim

            def publish(name: str, seed: int) -> None:
                vectors = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))
                registry.publish(LearnedConcept(name, vectors, base_model=model.identity))

            for i in range(16):
                publish(f"c{i}", i)

            # 3. hot-load vs cached, timed in-process through the replica's cache code
            cache = ConceptCache(registry, ttl=60, size=1024)
            hot, cached = [], []
            for i in range(30):
                publish(f"fresh{i}", 100 + i)
                started = time.perf_counter()
                cache.resolve(f"a photo of <fresh{i}>")
                hot.append((time.perf_counter() - started) * 1000)
                started = time.perf_counter()
                cache.resolve(f"a photo of <fresh{i}>")
                cached.append((time.perf_counter() - started) * 1000)

            # 5. the pipeline called directly, one thread like a 1-CPU replica
            torch.set_num_threads(1)
            generator = ImageGenerator(model)
            vectors = {"c0": registry.get("c0")[1].vectors}
            direct, direct_plain = [], []  # alternating, as over HTTP below: the pipeline's own cost of a concept
            for i in range(60):
                pair = [("a photo of <c0>", vectors, direct), ("a photo of a star", {}, direct_plain)]
                for prompt, concepts, into in pair if i % 2 == 0 else pair[::-1]:
                    started = time.perf_counter()
                    generator.generate([prompt], concepts, seeds=[i], steps=STEPS, height=SIZE, width=SIZE)
                    into.append((time.perf_counter() - started) * 1000)
            direct_diff = statistics.median(c - p for p, c in zip(direct_plain, direct, strict=True))

            port = free_port()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            base = f"http://127.0.0.1:{port}"
            rows = []
            results: dict[str, float] = {}
            for batch in (8, 1):
                settings = {"base_model": str(model_dir), "registry": location, "max_batch_size": batch,
                            "allow_anonymous": True,  # loopback only: no keys needed
                            "batch_wait_timeout_s": 0.01, "num_cpus": 1, "max_ongoing_requests": 32,
                            "max_queued_requests": 256, "min_size": 16, "max_size": 64}  # fmt: skip
                serve.run(build_app(settings), name="oneword", route_prefix="/")
                load(base, [body("a photo of <c0>", i) for i in range(8)], 4)  # warm-up
                label = "batched (8)" if batch > 1 else "unbatched"
                for concurrency in (1, 4, 16):
                    rate, latencies = load(base, [body("a photo of <c0>", i) for i in range(args.requests)],
                                           concurrency)  # fmt: skip
                    rows.append((label, concurrency, rate, percentile(latencies, 0.5), percentile(latencies, 0.95)))
                    print(f"{label} c={concurrency}: {rate:.2f} img/s", flush=True)
                if batch > 1:
                    # 2. alternating plain / concept requests on one connection, so drift and noise
                    # hit both alike; the cost is the median of the paired differences
                    plain, concept = pairs(base, args.pairs)
                    results["plain p50"], results["concept p50"] = statistics.median(plain), statistics.median(concept)
                    results["pair diff p50"] = statistics.median(c - p for p, c in zip(plain, concept, strict=True))
                    results["http c1 p50"] = statistics.median(concept)
                    # 4. every concept used once first (a first use is the hot-load, measured above)
                    load(base, [body(f"a photo of <c{i}>", i) for i in range(16)], 16)
                    single_rates, mixed_rates = [], []
                    for rep in range(args.reps):
                        seeds = range(rep * args.requests, (rep + 1) * args.requests)
                        single_rates.append(load(base, [body("a photo of <c0>", s) for s in seeds], 16)[0])
                        mixed_rates.append(load(base, [body(f"a photo of <c{s % 16}>", s) for s in seeds], 16)[0])
                    print(f"single-concept img/s per rep: {[round(r, 2) for r in single_rates]}; "
                          f"mixed: {[round(r, 2) for r in mixed_rates]}", flush=True)  # fmt: skip
                    results["single img/s"], results["mixed img/s"] = (statistics.median(single_rates),
                                                                       statistics.median(mixed_rates))  # fmt: skip
            serve.shutdown()
            ray.shutdown()

    print(f"\n{'variant':<14}{'concurrency':>12}{'images/s':>10}{'p50 ms':>9}{'p95 ms':>9}")
    for label, concurrency, rate, p50, p95 in rows:
        print(f"{label:<14}{concurrency:>12}{rate:>10.2f}{p50:>9.1f}{p95:>9.1f}")
    print(
        f"\nconcept vs plain prompt (c=1, {args.pairs} alternating pairs): p50 {results['concept p50']:.2f} vs "
        f"{results['plain p50']:.2f} ms ({(results['concept p50'] / results['plain p50'] - 1) * 100:+.2f}%); "
        f"median paired difference {results['pair diff p50']:+.2f} ms "
        f"({results['pair diff p50'] / results['plain p50'] * 100:+.2f}%)"
    )
    print(
        f"the same, the pipeline called in-process (60 pairs): median paired difference {direct_diff:+.3f} ms "
        f"({direct_diff / statistics.median(direct_plain) * 100:+.2f}%)"
    )
    print(
        f"hot-load from S3 (resolve a new concept): p50 {statistics.median(hot):.1f} ms, "
        f"p95 {percentile(hot, 0.95):.1f} ms; cached: p50 {statistics.median(cached):.3f} ms"
    )
    print(
        f"mixed-concept batches vs single-concept batches ({args.requests} requests, 16 concepts, c=16, "
        f"median of {args.reps}): {results['mixed img/s']:.2f} vs "
        f"{results['single img/s']:.2f} img/s = {results['mixed img/s'] / results['single img/s']:.2f}x"
    )
    print(
        f"Serve overhead (c=1 p50): HTTP {results['http c1 p50']:.1f} ms vs direct call "
        f"{statistics.median(direct):.1f} ms = {results['http c1 p50'] / statistics.median(direct):.2f}x"
    )
    print(
        f"tiny model, {SIZE}px, {STEPS} steps, {args.requests} requests per row; {platform.machine()}, "
        f"{len(os.sched_getaffinity(0))} cores"
    )


if __name__ == "__main__":
    main()

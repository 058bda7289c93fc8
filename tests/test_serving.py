"""The generation service: real HTTP against `oneword serve` on a real Ray head, tiny model."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from pipeline.engine.formats import LearnedConcept
from pipeline.engine.generation import ImageGenerator
from pipeline.engine.model import load_base_model
from pipeline.store.registry import Registry

from .conftest import DIM
from .prometheus import names, settled, until

API_KEY = "test-key-0123456789"
STEPS = 2


@contextlib.contextmanager
def running_service(ray_head, model_dir: Path, registry_dir: Path, settings: dict, log_dir: Path,
                    replicas: int) -> Iterator[str]:  # fmt: skip
    """`oneword serve` against the session's Ray head until the block ends (then SIGTERM, as Kubernetes
    or systemd stop it: a clean shutdown, exit 0); yields its base URL."""
    from tests.ceph_rgw import free_port

    port = free_port()
    env = ray_head.env
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--base-model", str(model_dir),
               "--registry", str(registry_dir), "--address", ray_head.gcs, "--port", str(port)]  # fmt: skip
    for key, value in settings.items():
        command += [f"--{key.replace('_', '-')}", str(value)]
    log = open(log_dir / "serve.log", "w")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while True:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"oneword serve did not become ready: {Path(log.name).read_text()[-3000:]}")
        time.sleep(0.5)
    try:
        wait_replicas(env, ray_head.jobs_api, replicas)
        yield base
        process.terminate()
        assert process.wait(timeout=60) == 0, Path(log.name).read_text()[-3000:]
    finally:
        process.kill()  # a no-op after the clean exit above
        serve_cli = os.path.join(os.path.dirname(sys.executable), "serve")
        subprocess.run([serve_cli, "shutdown", "-y", "-a", ray_head.jobs_api], env=env, capture_output=True,
                       timeout=120)  # fmt: skip
        log.close()


@pytest.fixture(scope="module")
def service(ray_head, tiny_model_dir, tmp_path_factory):
    """`oneword serve` with a folder registry and API keys from a file. (Replicas run in the
    cluster's processes: they see the cluster's environment and files, not this command's.)"""
    registry_dir = tmp_path_factory.mktemp("serve-registry")
    keys = tmp_path_factory.mktemp("serve-secret") / "keys"  # as a mounted Secret would be
    keys.write_text(f"other-key\n{API_KEY}\n")
    settings = {"api_keys_file": str(keys), "concept_ttl_s": 1, "default_steps": STEPS, "min_size": 16,
                "max_size": 64, "max_batch_size": 8, "batch_wait_timeout_s": 0.3, "num_cpus": 0.5,
                "max_steps": 20, "max_pixel_steps": 64 * 64 * 10 * 8, "max_body_bytes": 1024, "body_timeout_s": 2,
                "min_replicas": 2, "max_replicas": 2,
                "health_check_period_s": 1, "max_ongoing_requests": 8, "max_queued_requests": 16,
                "retry_after_s": 3}  # fmt: skip
    with running_service(ray_head, tiny_model_dir, registry_dir, settings, tmp_path_factory.mktemp("serve-log"),
                         replicas=2) as base:  # fmt: skip
        yield base, Registry.open(str(registry_dir))


def replica_pids(env: dict[str, str], address: str) -> list[int]:
    """Process ids of the running generator replicas, from Ray's state API."""
    import json

    ray_cli = os.path.join(os.path.dirname(sys.executable), "ray")
    command = [ray_cli, "list", "actors", "--address", address, "--format", "json", "--filter", "state=ALIVE"]
    listed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    actors = json.loads(listed.stdout or "[]")
    return [a["pid"] for a in actors if "oneword-generator" in (a.get("class_name") or "")]


def wait_replicas(env: dict[str, str], address: str, count: int, timeout: float = 240) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = replica_pids(env, address)
        if len(pids) >= count:
            return pids
        time.sleep(1)
    raise AssertionError(f"fewer than {count} generator replicas after {timeout}s")


def post(base: str, path: str, body: dict, key: str | None = API_KEY, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kwargs.pop("headers", {}))
    return httpx.post(f"{base}{path}", json=body, headers=headers, timeout=120, **kwargs)


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def publish(registry: Registry, name: str, seed: int, dim: int = DIM) -> str:
    vectors = torch.randn(1, dim, generator=torch.Generator().manual_seed(seed))
    model_identity = None if dim != DIM else _identity()
    return registry.publish(LearnedConcept(name, vectors, base_model=model_identity)).version


_IDENTITY: dict[str, str] = {}


def _identity() -> str:
    return _IDENTITY["value"]


@pytest.fixture(scope="module", autouse=True)
def _model_identity(tiny_model_dir):
    _IDENTITY["value"] = load_base_model(tiny_model_dir, "cpu").identity


def reference(model_dir: Path, prompt: str, concepts: dict[str, torch.Tensor], seeds: list[int], size: int):
    """The same images generated in this process, one thread like a replica."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generator = ImageGenerator(load_base_model(model_dir, "cpu"))
        images = generator.generate([prompt] * len(seeds), concepts, seeds=seeds, steps=STEPS, height=size,
                                    width=size)  # fmt: skip
        return [np.asarray(image) for image in images]
    finally:
        torch.set_num_threads(threads)


def test_generate_with_one_two_and_pinned_concepts(service, tiny_model_dir):
    base, registry = service
    a1 = publish(registry, "cat-a", 1)
    publish(registry, "cat-b", 2)
    response = post(base, "/v1/generate", {"prompt": "a photo of <cat-a>", "n": 2, "seed": 7, "width": 32,
                                          "height": 32})  # fmt: skip
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["concepts"] == {"cat-a": a1} and body["seed"] == 7 and (body["width"], body["height"]) == (32, 32)
    images = [decode(x) for x in body["images"]]
    assert [i.shape for i in images] == [(32, 32, 3)] * 2
    _, concept = registry.get("cat-a")
    expected = reference(tiny_model_dir, f"a photo of <cat-a@{a1}>", {f"cat-a@{a1}": concept.vectors}, [7, 8], 32)
    assert all(np.array_equal(x, y) for x, y in zip(images, expected, strict=True))

    two = post(base, "/v1/generate", {"prompt": "<cat-a> next to <cat-b>", "seed": 3, "width": 32, "height": 32})
    assert two.status_code == 200 and set(two.json()["concepts"]) == {"cat-a", "cat-b"}

    a2 = publish(registry, "cat-a", 11)
    pinned = post(base, "/v1/generate", {"prompt": f"a photo of <cat-a@{a1}>", "seed": 7, "width": 32, "height": 32})
    assert pinned.json()["concepts"] == {"cat-a": a1}
    assert np.array_equal(decode(pinned.json()["images"][0]), images[0])  # the pinned version, not the new one
    time.sleep(1.5)  # past the 1 s TTL of "latest"
    latest = post(base, "/v1/generate", {"prompt": "a photo of <cat-a>", "seed": 7, "width": 32, "height": 32})
    assert latest.json()["concepts"] == {"cat-a": a2}

    raw = post(base, "/v1/generate", {"prompt": "a photo of <cat-a>", "seed": 7, "width": 32, "height": 32},
               headers={"Accept": "image/png"})  # fmt: skip
    assert raw.headers["content-type"] == "image/png" and raw.content.startswith(b"\x89PNG")


def test_concept_published_while_serving_is_used_without_restart(service):
    base, registry = service
    missing = post(base, "/v1/generate", {"prompt": "a <brand-new>", "width": 32, "height": 32})
    assert missing.status_code == 404 and missing.json()["code"] == "concept_not_found"
    version = publish(registry, "brand-new", 5)
    found = post(base, "/v1/generate", {"prompt": "a <brand-new>", "width": 32, "height": 32})
    assert found.status_code == 200 and found.json()["concepts"] == {"brand-new": version}


def test_mixed_concept_batch_equals_each_request_alone(service):
    base, registry = service
    names = ["mix-a", "mix-b", "mix-c", "mix-d"]
    for i, name in enumerate(names):
        publish(registry, name, 100 + i)
    requests = [{"prompt": f"a photo of <{name}>", "seed": 40 + i, "width": 32, "height": 32}
                for i, name in enumerate(names)]  # fmt: skip
    alone = [decode(post(base, "/v1/generate", r).json()["images"][0]).astype(int) for r in requests]
    with ThreadPoolExecutor(len(requests)) as pool:  # arrive within one batch window (0.3 s)
        together = [decode(b64).astype(int) for b64 in
                    pool.map(lambda r: post(base, "/v1/generate", r).json()["images"][0], requests)]  # fmt: skip
    for mixed, single in zip(together, alone, strict=True):
        # Same seed, same image. Not always bit for bit: a batch of 4 runs its matrix products
        # with other block shapes than a batch of 1, so float sums round differently and a few
        # 8-bit values (measured: 0.03%) move by one level. Anything more would be a mix-up.
        difference = np.abs(mixed - single)
        assert difference.max() <= 1 and (difference > 0).mean() < 0.01


def test_errors_have_status_and_stable_codes(service):
    base, registry = service
    publish(registry, "spotty", 9)
    publish(registry, "wide", 9, dim=768)
    ok = {"prompt": "a photo of <spotty>", "width": 32, "height": 32}
    cases = [
        ({**ok, "prompt": "a photo of <spoty>"}, API_KEY, 404, "concept_not_found"),
        ({**ok, "prompt": "a photo of <wide>"}, API_KEY, 409, "incompatible_concept"),
        ({**ok, "prompt": "<spotty> " + "very " * 80}, API_KEY, 422, "prompt_too_long"),
        ({**ok, "width": 30}, API_KEY, 422, "invalid_size"),
        ({**ok, "width": 128}, API_KEY, 422, "invalid_size"),
        ({**ok, "n": 9}, API_KEY, 422, "too_many_images"),
        ({**ok, "n": 0}, API_KEY, 422, "invalid_request"),
        ({**ok, "steps": 21}, API_KEY, 422, "too_many_steps"),
        ({**ok, "width": 64, "height": 64, "steps": 20, "n": 8}, API_KEY, 422, "over_compute_budget"),
        ({**ok, "prompt": " \t\n "}, API_KEY, 422, "invalid_request"),
        ({**ok, "prompt": "a photo of <spotty@bad-version>"}, API_KEY, 422, "invalid_concept_name"),
        ({**ok, "prompt": "a photo of <spotty@..>"}, API_KEY, 422, "invalid_concept_name"),
        ({**ok, "prompt": "a photo of <spotty@.>"}, API_KEY, 422, "invalid_concept_name"),
        ({**ok, "negative_prompt": "<spotty@..>"}, API_KEY, 422, "invalid_concept_name"),
        ({**ok, "negative_prompt": "<spotty> " + "very " * 80}, API_KEY, 422, "prompt_too_long"),
        ({**ok, "bogus": 1}, API_KEY, 422, "invalid_request"),
        (ok, None, 401, "unauthorized"),
        (ok, "wrong-key", 401, "unauthorized"),
        ({**ok, "prompt": "y" * 1500}, API_KEY, 413, "request_too_large"),
    ]
    for body, key, status, code in cases:
        response = post(base, "/v1/generate", body, key=key)
        assert (response.status_code, response.json().get("code")) == (status, code), (body, response.text)
        assert "Traceback" not in response.text
        assert response.json()["request_id"] == response.headers["x-request-id"]  # the log line's id too
    traced = post(base, "/v1/generate", {**ok, "n": 0}, headers={"X-Request-Id": "trace-0123"})  # a client's id
    assert traced.json()["request_id"] == traced.headers["x-request-id"] == "trace-0123"
    close = post(base, "/v1/generate", {**ok, "prompt": "a photo of <spoty>"}).json()
    assert "spotty" in close["close_matches"]
    assert "in the registry" in close["message"] and str(registry.location) not in close["message"]
    negative = post(base, "/v1/generate", {**ok, "negative_prompt": "<spotty> " + "very " * 80}).json()
    assert negative["message"].startswith("negative prompt needs")
    openai = post(base, "/v1/images/generations", {"prompt": "<spotty@..>", "size": "32x32"})
    assert (openai.status_code, openai.json()["code"]) == (422, "invalid_concept_name")
    blank = post(base, "/v1/images/generations", {"prompt": "   ", "size": "32x32"})
    assert (blank.status_code, blank.json()["code"]) == (422, "invalid_request") and "prompt" in blank.json()["message"]
    # one code for every body that does not parse: bad JSON, bad encoding, deep nesting, huge numbers
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    for content in (b"{not json", b'{"prompt": "\xff\xfe"}', b"[" * 1000, b'{"prompt": "x", "n": ' + b"9" * 900 + b"}"):
        response = httpx.post(f"{base}/v1/generate", content=content, timeout=30, headers=headers)
        assert (response.status_code, response.json()["code"]) == (422, "invalid_request"), content[:40]


def test_bodies_are_limited_as_read_not_as_declared(service):
    """A chunked body (no Content-Length) over max_body_bytes gets 413 as soon as it passes the
    limit; a body that trickles in gets 408 after body_timeout_s, and the replica is free again."""
    import socket

    base, registry = service
    headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}

    def chunks():  # 64 chunks of 512 bytes: far over the limit of 1024, if the server read it all
        for _ in range(64):
            yield b" " * 512

    chunked = httpx.post(f"{base}/v1/generate", content=chunks(), timeout=30, headers=headers)
    assert (chunked.status_code, chunked.json()["code"]) == (413, "request_too_large")
    host, port = base.removeprefix("http://").split(":")
    idle = []
    for _ in range(16):  # as many as both replicas take at once: each declares 100 bytes, sends 10
        connection = socket.create_connection((host, int(port)), timeout=30)
        head = f"POST /v1/generate HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {API_KEY}\r\n"
        connection.sendall(f'{head}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"prompt":'.encode())
        idle.append(connection)
    started = time.monotonic()
    assert httpx.get(f"{base}/healthz", timeout=30).status_code == 200  # not held for ever behind them
    for connection in idle:
        answer = b""
        while b"request_timeout" not in answer and (chunk := connection.recv(4096)):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer, answer
        connection.close()
    assert time.monotonic() - started < 20
    publish(registry, "after-idle", 5)
    assert post(base, "/v1/generate", {"prompt": "<after-idle>", "width": 16, "height": 16}).status_code == 200


def test_concept_routes_health_and_openapi(service):
    base, registry = service
    config = {"images": "s3://private-bucket/customer-42/images", "steps": 3, "learning_rate": 0.005}
    vectors = torch.randn(1, DIM, generator=torch.Generator().manual_seed(3))
    version = registry.publish(LearnedConcept("listed", vectors, base_model=_identity(), config=config)).version
    headers = {"Authorization": f"Bearer {API_KEY}"}
    shown = httpx.get(f"{base}/v1/concepts/listed", headers=headers, timeout=30)
    assert shown.json()["latest"]["version"] == version and shown.json()["versions"] == [version]
    assert shown.json()["latest"]["config"] == {"steps": 3, "learning_rate": 0.005}  # no storage locations
    listing = httpx.get(f"{base}/v1/concepts", params={"prefix": "listed"}, headers=headers, timeout=30)
    assert [c["name"] for c in listing.json()["concepts"]] == ["listed"]
    assert "private-bucket" not in shown.text + listing.text
    assert httpx.get(f"{base}/v1/concepts/listd", headers=headers, timeout=30).json()["close_matches"] == ["listed"]
    assert httpx.get(f"{base}/healthz", timeout=30).json() == {"status": "ok"}
    spec = httpx.get(f"{base}/openapi.json", timeout=30).json()
    assert {"/v1/generate", "/v1/images/generations", "/v1/concepts", "/readyz"} <= set(spec["paths"])
    assert httpx.get(f"{base}/docs", timeout=30).status_code == 200


def test_openai_client_gets_images(service):
    from openai import OpenAI

    base, registry = service
    publish(registry, "oa-concept", 4)
    client = OpenAI(base_url=f"{base}/v1", api_key=API_KEY)
    result = client.images.generate(model="oneword", prompt="a photo of <oa-concept>", n=2, size="32x32",
                                    response_format="b64_json")  # fmt: skip
    assert len(result.data) == 2 and all(decode(d.b64_json).shape == (32, 32, 3) for d in result.data)
    zero = post(base, "/v1/images/generations", {"prompt": "x", "size": "0x0"})  # found by the fuzzer: was a 500
    assert (zero.status_code, zero.json()["code"]) == (422, "invalid_size")


def test_bounded_load_has_no_server_errors(service):
    base, registry = service
    publish(registry, "loaded", 8)
    body = {"prompt": "a photo of <loaded>", "width": 16, "height": 16, "steps": 1}

    def one(i: int) -> tuple[int, float]:
        started = time.perf_counter()
        response = post(base, "/v1/generate", {**body, "seed": i})
        return response.status_code, time.perf_counter() - started

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200)))
    statuses = [s for s, _ in results]
    latencies = sorted(t for _, t in results)
    print(f"load: 200 requests at concurrency 16: p50 {latencies[100] * 1000:.0f} ms, "
          f"p95 {latencies[190] * 1000:.0f} ms")  # fmt: skip
    assert statuses.count(200) == 200


def test_overload_is_refused_at_once_with_retry_after(service):
    """Beyond 2 replicas x (8 running + 16 queued), requests get 503 + Retry-After, not a wait."""
    base, registry = service
    publish(registry, "crowded", 13)
    body = {"prompt": "a photo of <crowded>", "width": 64, "height": 64, "steps": 10, "n": 8}

    def one(i: int) -> tuple[int, str | None]:
        response = post(base, "/v1/generate", {**body, "seed": i})
        return response.status_code, response.headers.get("retry-after")

    with ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(64)))
    served = [s for s, _ in results if s == 200]
    refused = [retry for s, retry in results if s == 503]
    assert len(served) + len(refused) == 64, results  # nothing else: no 500s, no timeouts
    assert len(served) >= 2 * 8 and len(refused) >= 1, results
    assert set(refused) == {"3"}
    assert post(base, "/v1/generate", {**body, "n": 1, "seed": 1}).status_code == 200  # and it recovers


def test_generation_slots_run_some_queue_some_and_refuse_the_rest():
    import asyncio

    from serving.generation_slots import GenerationSlots, OverloadedError

    async def scenario() -> None:
        slots, release, order = GenerationSlots(2, 1), asyncio.Event(), []

        async def generation(i: int) -> None:
            async with slots.hold():
                order.append(i)
                await release.wait()

        admitted = [asyncio.create_task(generation(i)) for i in range(3)]
        await asyncio.sleep(0.01)
        assert (slots.running, slots.waiting, order) == (2, 1, [0, 1])
        with pytest.raises(OverloadedError, match="all 2 generation slots and 1 queue places"):
            async with slots.hold():
                pass
        release.set()
        await asyncio.gather(*admitted)
        assert (slots.running, slots.waiting, order) == (0, 0, [0, 1, 2])
        # a waiter whose deadline passes gives its place back
        release.clear()
        holders = [asyncio.create_task(generation(i)) for i in range(2)]
        await asyncio.sleep(0.01)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(generation(9), 0.05)
        assert (slots.running, slots.waiting) == (2, 0)
        release.set()
        await asyncio.gather(*holders)

    asyncio.run(scenario())


def test_health_and_concept_reads_do_not_wait_behind_generations(service):
    """With the generation slots of both replicas taken and their queues filling (40 callers against
    2 x (8 + 16) places), health, readiness and the concept API still answer: light requests never
    take a generation slot (serving/generation_slots.py). /readyz says what the answering replica was
    doing at that moment."""
    base, registry = service
    publish(registry, "busy", 14)
    body = {"prompt": "a photo of <busy>", "width": 64, "height": 64, "steps": 10, "n": 8}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    stop = threading.Event()

    def keep_generating(caller: int) -> list[httpx.Response]:
        """One caller that sends its next generation as soon as the last is answered: the load holds
        until the checks below are done, however fast one burst would have drained."""
        answers = []
        while not stop.is_set():
            answers.append(post(base, "/v1/generate", {**body, "seed": caller}))
        return answers

    def full(readyz: httpx.Response) -> bool:  # all 8 slots running and more waiting on that replica
        generations = readyz.json()["generations"]
        return generations["running"] == 8 and generations["waiting"] >= 1

    def readyz_until_full() -> list[httpx.Response]:
        """/readyz until a full replica answers it: Serve's router may send any one request to the
        other replica, whose slots need not all be taken at that moment."""
        polls, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            polls.append(httpx.get(f"{base}/readyz", timeout=60))
            if full(polls[-1]):
                break
            time.sleep(0.02)
        return polls

    with ThreadPoolExecutor(40) as pool:
        callers = [pool.submit(keep_generating, caller) for caller in range(40)]
        try:
            first = readyz_until_full()[-1]  # the generations have reached a replica
            light = [httpx.get(f"{base}{path}", headers=headers, timeout=60)
                     for path in ("/healthz", "/v1/concepts", "/v1/concepts/busy")]  # fmt: skip
            light += readyz_until_full()
        finally:
            stop.set()
        answers = [answer for caller in callers for answer in caller.result()]
    assert full(first), first.json()
    assert {r.status_code for r in light} == {200}, [(r.url, r.status_code) for r in light]
    assert full(light[-1]), light[-1].json()  # answered while a replica's slots were all taken and it had a queue
    # served, or refused as documented where Serve's router sent a replica more than its 8 + 16
    # (it balances by all requests held, light ones included, and a burst outruns its view)
    outcomes = {(a.status_code, a.json().get("code")) for a in answers}
    assert outcomes <= {(200, None), (503, "overloaded")}, outcomes
    idle = httpx.get(f"{base}/readyz", timeout=60).json()
    assert idle["generations"] == {"running": 0, "waiting": 0}, idle


def test_killed_replica_under_load_loses_only_its_in_flight_requests(service, ray_head):
    base, registry = service
    publish(registry, "survivor", 12)
    body = {"prompt": "a photo of <survivor>", "width": 16, "height": 16, "steps": 1}
    pids = wait_replicas(ray_head.env, ray_head.jobs_api, 2)

    def one(i: int) -> int:
        if i == 40:
            os.kill(pids[0], signal.SIGKILL)  # one of the two replicas dies mid-load
        try:
            return post(base, "/v1/generate", {**body, "seed": i}).status_code
        except httpx.HTTPError:
            return 0

    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(one, range(160)))
    failed = [s for s in statuses if s != 200]
    # At most what that replica held (its max_ongoing_requests, 8) fails; the rest are served.
    assert len(failed) <= 8, statuses
    assert all(s in (0, 500, 502, 503) for s in failed)
    wait_replicas(ray_head.env, ray_head.jobs_api, 2)  # Serve replaces the dead replica
    assert post(base, "/v1/generate", {**body, "seed": 1}).status_code == 200


def test_fuzzing_the_openapi_spec_finds_no_server_errors(service):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    base, registry = service
    publish(registry, "fuzzed", 13)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    headers = {"Authorization": f"Bearer {API_KEY}"}
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def no_server_error(case):
            response = case.call(base_url=base, headers=headers)
            assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

        no_server_error()
        checked.append(operation.label)
    assert {"POST /v1/generate", "POST /v1/images/generations", "GET /v1/concepts/{name}"} <= set(checked)


def test_serve_config_file_builds_the_app_and_validates():
    from ray.serve.schema import ServeDeploySchema

    from serving.app import build_app
    from serving.settings import ServeSettings

    config = yaml.safe_load((Path(__file__).parents[1] / "deploy" / "serve-config.yaml").read_text())
    ServeDeploySchema(**config)  # the schema `serve deploy` and KubeRay's serveConfigV2 use
    [application] = config["applications"]
    assert application["import_path"] == "serving.app:build_app"
    app = build_app(application["args"])
    deployment = app._bound_deployment
    assert deployment.name == "oneword-generator"
    settings = ServeSettings(**application["args"])
    # a replica takes its generations, their queue and the light requests; generations queue inside it
    capacity = settings.max_ongoing_requests + settings.max_queued_requests + settings.max_light_requests
    assert deployment._deployment_config.max_ongoing_requests == capacity
    assert deployment._deployment_config.max_queued_requests == capacity  # a burst waits at the proxy
    assert config["http_options"] | settings.http_options("0.0.0.0", 8000) == config["http_options"]
    json_logs = build_app({**application["args"], "log_encoding": "JSON"})._bound_deployment
    assert json_logs._deployment_config.logging_config["encoding"] == "JSON"  # JSON lines with request ids
    assert os.environ.get("ONEWORD_TEST_NETNS") == "1"


def test_key_sources_that_hold_no_key_refuse_to_start(tmp_path, monkeypatch):
    """A configured source without a key is an error naming it, never an open service; no source at
    all is open only when allow_anonymous says so."""
    from serving.request_guard import KeySourceError, read_api_keys, service_keys

    monkeypatch.delenv("TEST_KEYS", raising=False)
    empty, blank, good = tmp_path / "empty", tmp_path / "blank", tmp_path / "good"
    empty.write_text(""), blank.write_text("  \n\t\n"), good.write_text("k1\n\n k2 \n")
    assert read_api_keys("TEST_KEYS", str(good)) == [b"k1", b"k2"]
    for path in (empty, blank, tmp_path / "missing"):
        with pytest.raises(KeySourceError, match=f"api_keys_file {path}"):
            read_api_keys("TEST_KEYS", str(path))
    for value in ("", " , ,,"):
        monkeypatch.setenv("TEST_KEYS", value)
        with pytest.raises(KeySourceError, match=r"\$TEST_KEYS is set but holds no API key"):
            read_api_keys("TEST_KEYS", None)
    monkeypatch.setenv("TEST_KEYS", "a, b")
    assert service_keys("TEST_KEYS", None, allow_anonymous=False) == [b"a", b"b"]
    monkeypatch.delenv("TEST_KEYS")
    with pytest.raises(KeySourceError, match="allow_anonymous"):
        service_keys("TEST_KEYS", None, allow_anonymous=False)
    assert service_keys("TEST_KEYS", None, allow_anonymous=True) == []


def test_oneword_serve_refuses_bad_key_sources_before_starting_anything(tmp_path):
    empty = tmp_path / "keys"
    empty.write_text("\n")
    env = {k: v for k, v in os.environ.items() if k != "ONEWORD_API_KEYS"}
    # --address names a port where nothing listens: had the command reached ray.init (and so the
    # model, which loads in Serve's replicas), it would fail there, not with the key source's error
    nowhere = ["--address", "127.0.0.1:1"]
    for extra, message in ((["--api-keys-file", str(empty)], f"api_keys_file {empty}: holds no API key"),
                           (["--host", "0.0.0.0"], "--host 0.0.0.0: no API keys")):  # fmt: skip
        result = subprocess.run([sys.executable, "-m", "pipeline.cli", "serve", *nowhere, *extra], env=env,
                                capture_output=True, text=True, timeout=300)  # fmt: skip
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_batches_never_exceed_the_pixel_budget():
    from serving.app import RenderJob, plan_calls

    def job(n: int, size: int = 64, steps: int = 2) -> RenderJob:
        return RenderJob(["p"] * n, [""] * n, list(range(n)), {}, steps, 7.5, size, size)

    jobs = [job(4), job(4), job(1), job(2, size=32), job(8), job(1, steps=3), job(20)]
    calls = plan_calls(jobs, max_pixels=9 * 64 * 64)
    assert calls == [[0, 1, 2], [3], [4], [5], [6]]  # 4+4+1 fit; 8 more would not; 20 alone is alone
    assert sorted(i for call in calls for i in call) == list(range(len(jobs)))
    for call in calls:
        assert len({jobs[i].shape for i in call}) == 1
        assert len(call) == 1 or sum(jobs[i].pixels for i in call) <= 9 * 64 * 64


def test_abandoned_generation_stops_at_the_next_step(tiny_model_dir):
    """What the service does when a request times out or its client leaves: the pipeline call asks
    after every denoising step and skips the rest once nobody waits."""
    generator = ImageGenerator(load_base_model(tiny_model_dir, "cpu"))
    asked = []

    def should_stop() -> bool:
        asked.append(1)
        return len(asked) >= 2

    images = generator.generate(["a photo"], {}, steps=20, height=16, width=16, should_stop=should_stop)
    assert len(images) == 1 and images[0].size == (16, 16)
    assert len(asked) == 2  # asked after the first and the second step, then the loop stopped asking


def test_metrics_move_by_what_the_service_did(service, ray_head):
    """Ray's metrics agent exports oneword's counters and histograms from the replicas; a known set of
    requests moves them by exactly that much (counters summed over both replicas)."""
    base, registry = service
    publish(registry, "metered", 21)
    families = ("ray_oneword_http_request", "ray_oneword_images", "ray_oneword_auth", "ray_oneword_requests_refused",
                "ray_oneword_concept_resolutions", "ray_oneword_batch_images")  # fmt: skip
    before = settled(ray_head.metrics, families)
    ok = {"prompt": "a photo of <metered>", "width": 16, "height": 16, "steps": 1}
    for i in range(3):
        assert post(base, "/v1/generate", {**ok, "n": 2, "seed": i}).status_code == 200
    assert post(base, "/v1/generate", ok, key="wrong").status_code == 401
    assert post(base, "/v1/generate", {**ok, "width": 64, "height": 64, "steps": 20, "n": 8}).status_code == 422
    assert post(base, "/v1/generate", {**ok, "prompt": "<no-such-concept>"}).status_code == 404

    def moved(key: str, now: dict[str, float]) -> float:
        return now.get(key, 0.0) - before.get(key, 0.0)

    expected = {
        "ray_oneword_http_requests_total{route=/v1/generate,status=200}": 3,
        "ray_oneword_http_requests_total{route=/v1/generate,status=401}": 1,
        "ray_oneword_http_requests_total{route=/v1/generate,status=422}": 1,
        "ray_oneword_http_requests_total{route=/v1/generate,status=404}": 1,
        "ray_oneword_images_generated_total{}": 6,
        "ray_oneword_auth_failures_total{}": 1,
        "ray_oneword_requests_refused_total{reason=over_compute_budget}": 1,
        "ray_oneword_concept_resolutions_total{outcome=not_found}": 1,
        "ray_oneword_http_request_seconds_count{route=/v1/generate}": 6,
    }
    after = until(ray_head.metrics, lambda now: all(moved(k, now) >= v for k, v in expected.items()))
    assert {key: moved(key, after) for key in expected} == expected, sorted(after)[:40]
    resolutions = "ray_oneword_concept_resolutions_total{{outcome={}}}"
    resolved = sum(moved(resolutions.format(outcome), after) for outcome in ("memory", "registry"))
    assert resolved == 3  # each of the three good requests resolved <metered>, from the registry or memory
    # three pipeline calls of two images each (Ray's exported histogram sums are approximate: buckets only)
    buckets = {float(k.split("le=")[1].rstrip("}")): moved(k, after) for k in after if "batch_images_bucket" in k}
    assert moved("ray_oneword_batch_images_count{}", after) == 3 and (buckets[1.0], buckets[2.0]) == (0, 3)


def test_dashboard_queries_name_metrics_that_exist(service, ray_head):
    """Every metric a panel of the shipped Grafana dashboard queries is exported: oneword's are
    declared in the code, Ray's and Serve's are on the head's endpoint (a serving cluster's)."""
    import json

    # these modules declare their metrics on import
    import pipeline.jobs.metrics
    import pipeline.store.registry  # noqa: F401
    import serving.metrics  # noqa: F401
    from pipeline.metrics import DECLARED

    board = json.loads((Path(__file__).parents[1] / "deploy/helm/oneword/dashboards/oneword.json").read_text())
    ours = {metric.exported_name for metric in DECLARED}
    queried = {name for panel in board["panels"] for target in panel["targets"]
               for name in re.findall(r"\bray_[a-z_]+", target["expr"])}  # fmt: skip
    exported: set[str] = set()  # over a few scrapes: a gauge not re-reported in time is briefly absent
    for _ in range(30):
        exported |= names(ray_head.metrics)
        if all(name in exported for name in queried if not name.startswith("ray_oneword_")):
            break
        time.sleep(1)
    assert any(n.startswith("ray_oneword_") for n in queried) and any(n.startswith("ray_serve_") for n in queried)
    for name in queried:
        if name.startswith("ray_oneword_"):
            assert re.sub(r"_(bucket|sum|count)$", "", name) in ours, name
        else:
            assert name in exported, (name, sorted(n for n in exported if n.startswith(name[:12])))

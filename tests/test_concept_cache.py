"""The replica's concept cache on its own: refresh-ahead of `latest`, without Ray or HTTP."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.engine.formats import LearnedConcept
from pipeline.store.registry import ConceptNotFoundError, Registry
from serving.concept_cache import ConceptCache


def publish(registry: Registry, name: str, seed: int) -> str:
    vectors = torch.randn(1, 8, generator=torch.Generator().manual_seed(seed))
    return registry.publish(LearnedConcept(name, vectors)).version


def test_names_in_use_are_kept_fresh_without_requests_waiting(tmp_path):
    registry = Registry.open(str(tmp_path / "registry"))
    first = publish(registry, "fresh", 1)
    # The refresher re-resolves a name half way to its TTL and wakes every quarter TTL, so a
    # refresh lands a quarter TTL before expiry. 2 s leaves it 0.5 s for a registry read and a
    # load on a busy CI machine (0.4 s, 0.1 s of slack, once missed there).
    cache = ConceptCache(registry, ttl=2.0, size=8)
    assert cache.resolve("a photo of <fresh>").prompt == f"a photo of <fresh@{first}>"
    second = publish(registry, "fresh", 2)
    seen = []
    for _ in range(45):  # 4.5 s of requests, two TTLs and more
        resolved = cache.resolve("a photo of <fresh>", cached_only=True)
        assert resolved is not None  # answered from memory every time: no request waits on the registry
        seen.append(resolved.versions["fresh"])
        time.sleep(0.1)
    assert seen[0] == first and seen[-1] == second and seen == sorted(seen)  # the new version arrived, once
    assert cache.lookups == 1  # only the very first request asked the registry itself
    assert cache.loads == 2  # the new version's vectors were loaded in the background
    _, expected = registry.get("fresh", second)
    assert torch.equal(cache.resolve("<fresh>", cached_only=True).vectors[f"fresh@{second}"], expected.vectors)


def test_idle_names_are_resolved_by_their_next_request(tmp_path):
    registry = Registry.open(str(tmp_path / "registry"))
    version = publish(registry, "idle", 1)
    cache = ConceptCache(registry, ttl=0.2, size=8, keep_fresh_for=0.3)
    cache.resolve("<idle>")
    time.sleep(1.0)  # unused for longer than keep_fresh_for: no longer refreshed
    assert cache.resolve("<idle>", cached_only=True) is None  # a miss, not a stale answer
    assert cache.resolve("<idle>").versions == {"idle": version}
    assert cache.lookups == 2


def test_a_deleted_name_stops_resolving(tmp_path):
    registry = Registry.open(str(tmp_path / "registry"))
    version = publish(registry, "gone", 1)
    cache = ConceptCache(registry, ttl=0.2, size=8)
    cache.resolve("<gone>")
    registry.delete("gone", version)
    answers = []
    for _ in range(20):
        answers.append(cache.resolve("<gone>", cached_only=True))
        time.sleep(0.05)
    assert answers[-1] is None  # the refresh found it gone and dropped it
    with pytest.raises(ConceptNotFoundError):
        cache.resolve("<gone>")


def test_pinned_versions_are_served_from_memory_once_loaded(tmp_path):
    registry = Registry.open(str(tmp_path / "registry"))
    version = publish(registry, "pinned", 1)
    cache = ConceptCache(registry, ttl=0, size=8)  # ttl 0: `latest` is always asked; pins never
    assert cache.resolve(f"<pinned@{version}>", cached_only=True) is None
    cache.resolve(f"<pinned@{version}>")
    assert cache.resolve(f"<pinned@{version}>", cached_only=True).versions == {"pinned": version}
    assert cache.resolve("<pinned>", cached_only=True) is None
    assert cache.loads == 1

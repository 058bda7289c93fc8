"""Per-replica concept cache: how a replica serves concepts published after it started.

Pinned references (``<name@version>``) are immutable, so they are cached until evicted (LRU).
``<name>`` means "latest": its resolution (name -> version) is cached for ``ttl`` seconds, then
asked of the registry again, so a new version is served within ``ttl`` without a restart.
Prompts are rewritten to pinned references, so one batch can hold requests resolved at
different times without two meanings for one key.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from pipeline.concepts import ConceptRef, parse_prompt
from pipeline.formats import LearnedConcept
from pipeline.registry import Registry


@dataclass(frozen=True)
class ResolvedPrompt:
    prompt: str  # with every reference pinned: <name@version>
    negative: str
    vectors: dict[str, torch.Tensor]  # "name@version" -> [n, dim]
    versions: dict[str, str]  # name -> version used


class ConceptCache:
    def __init__(self, registry: Registry, ttl: float, size: int, check=None):
        self.registry, self.ttl, self.size = registry, ttl, size
        self.check = check  # called on every newly loaded concept (compatibility with the model)
        self._concepts: OrderedDict[str, LearnedConcept] = OrderedDict()  # "name@version" -> concept
        self._latest: dict[str, tuple[str, float]] = {}  # name -> (version, resolved at)
        self._lock = threading.Lock()
        self.loads = 0  # registry fetches of concept files (for tests and benchmarks)

    def latest_version(self, name: str) -> str:
        with self._lock:
            cached = self._latest.get(name)
        if cached and time.monotonic() - cached[1] < self.ttl:
            return cached[0]
        version = self.registry.manifest(name).version
        with self._lock:
            self._latest[name] = (version, time.monotonic())
        return version

    def concept(self, name: str, version: str) -> LearnedConcept:
        key = f"{name}@{version}"
        with self._lock:
            if key in self._concepts:
                self._concepts.move_to_end(key)
                return self._concepts[key]
        _, concept = self.registry.get(name, version)
        if self.check is not None:
            self.check(concept)
        with self._lock:
            self.loads += 1
            self._concepts[key] = concept
            while len(self._concepts) > self.size:
                self._concepts.popitem(last=False)
        return concept

    def resolve(self, prompt: str, negative: str = "") -> ResolvedPrompt:
        """Pins every reference in the prompt and the negative prompt, loading what is missing."""
        versions: dict[str, str] = {}
        vectors: dict[str, torch.Tensor] = {}

        def pin(text: str) -> str:
            out = []
            for part in parse_prompt(text):
                if isinstance(part, ConceptRef):
                    version = part.version or versions.get(part.name) or self.latest_version(part.name)
                    versions.setdefault(part.name, version)
                    vectors[f"{part.name}@{version}"] = self.concept(part.name, version).vectors
                    out.append(f"<{part.name}@{version}>")
                else:
                    out.append(part)
            return "".join(out)

        pinned = pin(prompt)
        return ResolvedPrompt(pinned, pin(negative), vectors, versions)

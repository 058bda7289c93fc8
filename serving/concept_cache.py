"""Per-replica concept cache: how a replica serves concepts published after it started.

Pinned references (``<name@version>``) are immutable, so they are cached until evicted (LRU).
``<name>`` means "latest": its resolution (name -> version) is trusted for ``ttl`` seconds.
A background thread re-resolves the names in use before their ``ttl`` runs out (and loads a
new version's vectors), so a version published after startup is served within ``ttl``
without a restart, and requests for names in use never wait on the registry. Names unused
for a minute drop out of that refresh; their next request resolves them itself.

Prompts are rewritten to pinned references, so one batch can hold requests resolved at
different times without two meanings for one key.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pipeline.engine.concepts import ConceptRef, parse_prompt
from pipeline.engine.formats import LearnedConcept
from pipeline.store.registry import ConceptNotFoundError, Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ResolvedPrompt:
    prompt: str  # with every reference pinned: <name@version>
    negative: str
    vectors: dict[str, torch.Tensor]  # "name@version" -> [n, dim]
    versions: dict[str, str]  # name -> version used


@dataclass
class _Latest:
    version: str
    resolved_at: float  # when the registry was asked (monotonic seconds)
    used_at: float


class ConceptCache:
    def __init__(self, registry: Registry, ttl: float, size: int,
                 check: Callable[[LearnedConcept], None] | None = None, keep_fresh_for: float = 60.0,
                 on_load: Callable[[float], None] | None = None):  # fmt: skip
        self.registry, self.ttl, self.size = registry, ttl, size
        self.on_load = on_load  # told the seconds of every registry fetch of a concept (metrics)
        self.keep_fresh_for = keep_fresh_for  # seconds after its last use that a name is refreshed ahead
        self.check = check  # called on every newly loaded concept (compatibility with the model)
        self._concepts: OrderedDict[str, LearnedConcept] = OrderedDict()  # "name@version" -> concept
        self._latest: dict[str, _Latest] = {}
        self._lock = threading.Lock()
        self._refresher: threading.Thread | None = None
        self.loads = 0  # registry fetches of concept files (for tests and benchmarks)
        self.lookups = 0  # `latest` resolutions a caller waited for (the rest were refreshed ahead)

    # --- the request path ---

    def resolve(self, prompt: str, negative: str = "", cached_only: bool = False) -> ResolvedPrompt | None:
        """Pins every reference in the prompt and the negative prompt, loading what is missing.
        With ``cached_only``, returns None instead of asking the registry (no I/O: safe to call
        on an event loop)."""
        versions: dict[str, str] = {}
        vectors: dict[str, torch.Tensor] = {}

        def pin(text: str) -> str | None:
            out = []
            for part in parse_prompt(text):
                if isinstance(part, ConceptRef):
                    version = part.version or versions.get(part.name) or self.latest_version(part.name, cached_only)
                    concept = self.concept(part.name, version, cached_only) if version else None
                    if concept is None:
                        return None
                    versions.setdefault(part.name, version)
                    vectors[f"{part.name}@{version}"] = concept.vectors
                    out.append(f"<{part.name}@{version}>")
                else:
                    out.append(part)
            return "".join(out)

        pinned, pinned_negative = pin(prompt), pin(negative)
        if pinned is None or pinned_negative is None:
            return None
        return ResolvedPrompt(pinned, pinned_negative, vectors, versions)

    def latest_version(self, name: str, cached_only: bool = False) -> str | None:
        now = time.monotonic()
        with self._lock:
            entry = self._latest.get(name)
            if entry is not None and now - entry.resolved_at < self.ttl:
                entry.used_at = now
                return entry.version
        if cached_only:
            return None
        version = self.registry.manifest(name).version
        with self._lock:
            self.lookups += 1
            self._latest[name] = _Latest(version, now, now)
        self._start_refresher()
        return version

    def concept(self, name: str, version: str, cached_only: bool = False) -> LearnedConcept | None:
        key = f"{name}@{version}"
        with self._lock:
            if key in self._concepts:
                self._concepts.move_to_end(key)
                return self._concepts[key]
        if cached_only:
            return None
        started = time.monotonic()
        _, concept = self.registry.get(name, version)
        if self.on_load is not None:
            self.on_load(time.monotonic() - started)
        if self.check is not None:
            self.check(concept)
        with self._lock:
            self.loads += 1
            self._concepts[key] = concept
            while len(self._concepts) > self.size:
                self._concepts.popitem(last=False)
        return concept

    # --- refresh-ahead ---

    def _start_refresher(self) -> None:
        if self.ttl <= 0:
            return
        with self._lock:
            if self._refresher is None:
                self._refresher = threading.Thread(target=self._refresh_forever, name="concept-refresh", daemon=True)
                self._refresher.start()

    def _refresh_forever(self) -> None:
        while True:
            time.sleep(self.ttl / 4)
            self.refresh_due()

    def refresh_due(self) -> None:
        """Re-resolves names used recently whose resolution is half way to its TTL; forgets idle ones."""
        now = time.monotonic()
        with self._lock:
            idle = [name for name, e in self._latest.items() if now - e.used_at >= self.keep_fresh_for]
            for name in idle:
                del self._latest[name]
            due = [name for name, e in self._latest.items() if now - e.resolved_at >= self.ttl / 2]
        for name in due:
            asked = time.monotonic()
            try:
                version = self.registry.manifest(name).version
                self.concept(name, version)  # a new version's vectors, loaded before anyone asks
            except ConceptNotFoundError:  # deleted: requests will say so themselves
                with self._lock:
                    self._latest.pop(name, None)
                continue
            except Exception as err:  # unreachable, incompatible: requests resolve (and report) it after the TTL
                logger.warning("refreshing concept %r: %s", name, err)
                continue
            with self._lock:
                entry = self._latest.get(name)
                if entry is not None:
                    entry.version, entry.resolved_at = version, asked

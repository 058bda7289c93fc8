"""oneword's metrics, through ``ray.util.metrics``: Ray's metrics agent exports them in Prometheus
format on every node (``ray start --metrics-export-port``), next to Ray's, Train's and Serve's.
Ray prefixes every name with ``ray_`` (and counters get ``_total``): ``oneword_http_requests`` is
scraped as ``ray_oneword_http_requests_total``.

A metric is declared once at module level and becomes real the first time it records in a
process where Ray is running; anywhere else (the CLI without Ray, unit tests) recording does
nothing and never imports or starts Ray. Labels must stay bounded: route templates, status
codes, states, job ids; never a concept name or a prompt.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

# seconds: from a cached lookup to a long generation or a checkpoint upload
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
COUNT_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


_CREATING = threading.Lock()
DECLARED: list[Metric] = []  # every metric declared in a module imported so far (docs, dashboard checks)


class Metric:
    """A counter, gauge or histogram named ``oneword_<name>``; see the module docstring."""

    def __init__(self, kind: str, name: str, description: str, tags: tuple[str, ...] = (),
                 boundaries: list[float] | None = None):  # fmt: skip
        self.kind, self.name, self.description, self.tags, self.boundaries = kind, name, description, tags, boundaries
        self._metric: Any = None
        DECLARED.append(self)

    @property
    def exported_name(self) -> str:
        """The name Prometheus scrapes (histograms add ``_bucket``, ``_sum``, ``_count``)."""
        return f"ray_oneword_{self.name}" + ("_total" if self.kind == "counter" else "")

    def _real(self) -> Any:
        if self._metric is not None:
            return self._metric
        ray = sys.modules.get("ray")  # not imported: certainly not running
        if ray is None or not ray.is_initialized():
            return None
        with _CREATING:  # request handlers and background threads may record first at once
            if self._metric is not None:
                return self._metric
            from ray.util import metrics

            options: dict[str, Any] = {"description": self.description, "tag_keys": self.tags}
            if self.kind == "histogram":
                options["boundaries"] = self.boundaries
            self._metric = {"counter": metrics.Counter, "gauge": metrics.Gauge, "histogram": metrics.Histogram}[
                self.kind
            ](f"oneword_{self.name}", **options)
            return self._metric

    def inc(self, value: float = 1.0, **tags: str) -> None:
        if (metric := self._real()) is not None:
            metric.inc(value, tags=tags or None)

    def set(self, value: float, **tags: str) -> None:
        if (metric := self._real()) is not None:
            metric.set(value, tags=tags or None)

    def observe(self, value: float, **tags: str) -> None:
        if (metric := self._real()) is not None:
            metric.observe(value, tags=tags or None)


def counter(name: str, description: str, *tags: str) -> Metric:
    return Metric("counter", name, description, tags)


def gauge(name: str, description: str, *tags: str) -> Metric:
    return Metric("gauge", name, description, tags)


def histogram(name: str, description: str, boundaries: list[float], *tags: str) -> Metric:
    return Metric("histogram", name, description, tags, boundaries)

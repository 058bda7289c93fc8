"""The service's own metrics, through ``ray.util.metrics``: Ray's metrics agent exports them in
Prometheus format on every node, next to Ray's and Serve's (Ray prefixes them ``ray_``, so
``oneword_http_requests`` is scraped as ``ray_oneword_http_requests_total``).

Labels are bounded: a route template (never a raw path), a status code, an outcome or reason from
a fixed list; never a concept name or a prompt. Outside a Ray worker (unit tests, the CLI)
every metric is a no-op, so nothing here ever starts Ray.
"""

from __future__ import annotations

import time
from typing import Any

# seconds: from a cached concept to a long generation on CPU
LATENCY_BOUNDARIES = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]

ROUTES = ("/v1/generate", "/v1/images/generations", "/v1/concepts", "/healthz", "/readyz", "/docs", "/openapi.json")


def route_of(path: str) -> str:
    """The route template a path belongs to: a bounded label, whatever clients send."""
    if path.startswith("/v1/concepts/"):
        return "/v1/concepts/{name}"
    return path if path in ROUTES else "other"


class _Off:
    """Stands in for a metric outside Ray."""

    def inc(self, value: float = 1.0, tags: dict[str, str] | None = None) -> None:
        pass

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        pass


class ServingMetrics:
    def __init__(self) -> None:
        import ray

        if not ray.is_initialized():
            off = _Off()
            self.requests = self.latency = self.images = self.batch_images = self.batch_requests = off
            self.resolutions = self.load_seconds = self.auth_failures = self.refused = off
            return
        from ray.util.metrics import Counter, Histogram

        def counter(name: str, description: str, *tags: str) -> Any:
            return Counter(f"oneword_{name}", description=description, tag_keys=tags)

        def histogram(name: str, description: str, boundaries: list[float], *tags: str) -> Any:
            return Histogram(f"oneword_{name}", description=description, boundaries=boundaries, tag_keys=tags)

        self.requests = counter("http_requests", "HTTP requests answered, by route and status code", "route", "status")
        self.latency = histogram("http_request_seconds", "HTTP request latency", LATENCY_BOUNDARIES, "route")
        self.images = counter("images_generated", "images generated and returned")
        self.batch_images = histogram("batch_images", "images per pipeline call", SIZE_BOUNDARIES)
        self.batch_requests = histogram("batch_requests", "requests per pipeline call", SIZE_BOUNDARIES)
        self.resolutions = counter("concept_resolutions", "concept references resolved, by outcome: memory, "
                                   "registry, not_found, incompatible, invalid", "outcome")  # fmt: skip
        self.load_seconds = histogram("concept_load_seconds", "registry fetch of a concept version (hot-load)",
                                      LATENCY_BOUNDARIES)  # fmt: skip
        self.auth_failures = counter("auth_failures", "requests refused for a missing or wrong API key")
        self.refused = counter("requests_refused", "requests refused for a limit, by reason", "reason")


_METRICS: list[ServingMetrics] = []  # one per process, made on first use (after Ray is up)


def metrics() -> ServingMetrics:
    if not _METRICS:
        _METRICS.append(ServingMetrics())
    return _METRICS[0]


class RequestMetrics:
    """ASGI middleware: every HTTP request counted by route and status, and timed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), {"code": 500}

        async def recording_send(message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route, recorded = route_of(scope["path"]), metrics()
            recorded.requests.inc(tags={"route": route, "status": str(status["code"])})
            recorded.latency.observe(time.perf_counter() - started, tags={"route": route})

"""The generation service's metrics (see ``pipeline.metrics`` for how they are exported).

Labels: a route template (never a raw path), a status code, an outcome or reason from a fixed
list; never a concept name or a prompt.
"""

from __future__ import annotations

import time

from pipeline.metrics import COUNT_BOUNDARIES, LATENCY_BOUNDARIES, counter, histogram

requests = counter("http_requests", "HTTP requests answered, by route and status code", "route", "status")
latency = histogram("http_request_seconds", "HTTP request latency", LATENCY_BOUNDARIES, "route")
images = counter("images_generated", "images generated and returned")
batch_images = histogram("batch_images", "images per pipeline call", COUNT_BOUNDARIES)
batch_requests = histogram("batch_requests", "requests per pipeline call", COUNT_BOUNDARIES)
resolutions = counter("concept_resolutions", "concept references resolved, by outcome: memory, registry, not_found, "
                      "incompatible, invalid", "outcome")  # fmt: skip
load_seconds = histogram("concept_load_seconds", "registry fetch of a concept version (hot-load)", LATENCY_BOUNDARIES)
auth_failures = counter("auth_failures", "requests refused for a missing or wrong API key")
refused = counter("requests_refused", "requests refused for a limit, by reason", "reason")

ROUTES = ("/v1/generate", "/v1/images/generations", "/v1/concepts", "/healthz", "/readyz", "/docs", "/openapi.json")


def route_of(path: str) -> str:
    """The route template a path belongs to: a bounded label, whatever clients send."""
    if path.startswith("/v1/concepts/"):
        return "/v1/concepts/{name}"
    return path if path in ROUTES else "other"


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
            route = route_of(scope["path"])
            requests.inc(route=route, status=str(status["code"]))
            latency.observe(time.perf_counter() - started, route=route)

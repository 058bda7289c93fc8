"""API keys and request bodies, checked before any route sees a request.

``RequestGuard`` is plain ASGI middleware: it checks the API key on ``/v1/`` (401), then reads the
whole body itself, counting the bytes that actually arrive (413 over ``max_body_bytes``, whether
or not a Content-Length was declared) under a deadline (408 when a client sends too slowly), and
only then hands the request on. A route therefore never waits on a client's socket, and a
declared length is never trusted for more than an early refusal.

State lives in this module (one replica per process) and is looked up at call time: Ray Serve
ships the FastAPI app to replicas by value, so a global in ``serving.app`` seen by the
middleware would be a copy that the replica's constructor never updates.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse

from pipeline.errors import InputError

logger = logging.getLogger(__name__)

LIMITS: dict[str, Any] = {"max_body_bytes": 64 * 1024, "body_timeout_s": 10.0, "api_keys": []}


class KeySourceError(InputError):
    """An API key source that is configured but cannot be used: the service must not start open."""


def read_api_keys(env_name: str, file: str | None) -> list[bytes]:
    """The bearer tokens from ``$env_name`` (comma-separated) and ``file`` (one per line).

    A source that is configured but holds no key (a set but empty variable, a variable of only
    commas, an empty or whitespace-only file) and a file that cannot be read are errors naming
    the source: a typo in a Secret must not silently open the service.
    """
    keys: list[str] = []
    if env_name in os.environ:
        found = [k.strip() for k in os.environ[env_name].split(",") if k.strip()]
        if not found:
            raise KeySourceError(f"${env_name} is set but holds no API key (comma-separated); unset it or add keys")
        keys += found
    if file:
        try:
            text = Path(file).read_text()
        except (OSError, UnicodeDecodeError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else type(err).__name__
            raise KeySourceError(f"api_keys_file {file}: cannot read it ({reason})") from None
        found = [line.strip() for line in text.splitlines() if line.strip()]
        if not found:
            raise KeySourceError(f"api_keys_file {file}: holds no API key (one per line)")
        keys += found
    return [k.encode() for k in keys]


def service_keys(env_name: str, file: str | None, allow_anonymous: bool) -> list[bytes]:
    """The keys a service starts with; none only when ``allow_anonymous`` says so (with a warning)."""
    keys = read_api_keys(env_name, file)
    if not keys and not allow_anonymous:
        raise KeySourceError(
            f"no API keys (${env_name} unset, no api_keys_file) and allow_anonymous is not set: refusing to "
            "serve an open API; give keys, or set allow_anonymous: true to serve without them"
        )
    if not keys:
        logger.warning("no API keys: the API is open to anyone who can reach it (allow_anonymous)")
    return keys


def configure(max_body_bytes: int, body_timeout_s: float, api_keys: list[bytes]) -> None:
    LIMITS.update(max_body_bytes=max_body_bytes, body_timeout_s=body_timeout_s, api_keys=list(api_keys))


def authorized(authorization: str) -> bool:
    keys: list[bytes] = LIMITS["api_keys"]
    if not keys:
        return True
    given = authorization[len("Bearer ") :].strip().encode() if authorization.startswith("Bearer ") else b""
    return any(hmac.compare_digest(given, key) for key in keys)  # constant time per key


class _TooLargeError(Exception):
    pass


async def _read_body(receive, limit: int) -> bytes:
    """The body's bytes as they arrive, refused as soon as they pass ``limit``."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectionAbortedError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLargeError
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _error(headers: dict[bytes, bytes], status: int, code: str, message: str) -> JSONResponse:
    """The API's error body (as serving.app writes it), with Serve's request id."""
    request_id = headers.get(b"x-request-id", b"").decode("latin-1") or None
    return JSONResponse({"code": code, "message": message, "request_id": request_id}, status_code=status)


class RequestGuard:
    """ASGI middleware; see the module docstring."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from serving import metrics

        headers = dict(scope["headers"])
        if scope["path"].startswith("/v1/") and not authorized(headers.get(b"authorization", b"").decode("latin-1")):
            metrics.auth_failures.inc()
            message = "missing or invalid API key (Authorization: Bearer <key>)"
            return await _error(headers, 401, "unauthorized", message)(scope, receive, send)
        limit, declared = int(LIMITS["max_body_bytes"]), headers.get(b"content-length")
        too_large = _error(headers, 413, "request_too_large", f"request body over {limit} bytes")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            metrics.refused.inc(reason="request_too_large")
            return await too_large(scope, receive, send)
        try:
            body = await asyncio.wait_for(_read_body(receive, limit), LIMITS["body_timeout_s"])
        except _TooLargeError:
            metrics.refused.inc(reason="request_too_large")
            return await too_large(scope, receive, send)
        except TimeoutError:
            metrics.refused.inc(reason="request_timeout")
            message = f"request body not received within {LIMITS['body_timeout_s']:g} s"
            return await _error(headers, 408, "request_timeout", message)(scope, receive, send)
        except ConnectionAbortedError:
            return None  # the client left: nobody to answer

        delivered = False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        return await self.app(scope, replay, send)

"""API keys and body limits, checked before any route reads a request.

State lives in this module (one replica per process) and is looked up at call time: Ray Serve
ships the FastAPI app to replicas by value, so a global in ``serving.app`` seen by the
middleware would be a copy that the replica's constructor never updates.
"""

from __future__ import annotations

import hmac

LIMITS: dict[str, object] = {"max_body_bytes": 64 * 1024, "api_keys": []}


def configure(max_body_bytes: int, api_keys: list[bytes]) -> None:
    LIMITS["max_body_bytes"], LIMITS["api_keys"] = max_body_bytes, list(api_keys)


def authorized(authorization: str) -> bool:
    keys: list[bytes] = LIMITS["api_keys"]  # type: ignore[assignment]
    if not keys:
        return True
    given = authorization[len("Bearer ") :].strip().encode() if authorization.startswith("Bearer ") else b""
    return any(hmac.compare_digest(given, key) for key in keys)  # constant time per key


def body_too_large(content_length: str | None) -> int | None:
    """The limit when the declared body is over it (or unparseable), else None."""
    limit = int(LIMITS["max_body_bytes"])  # type: ignore[arg-type]
    if content_length is not None and (not content_length.isdigit() or int(content_length) > limit):
        return limit
    return None

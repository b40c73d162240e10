"""The guards in front of every endpoint: bearer API keys, per-key rate limits and a request-size limit.

Keys are read once, when the application is built (from a file with one key per line and/or an environment variable
with comma-separated keys), and only their SHA-256 digests travel to the ingress replicas: the Serve config, the
dashboard and replica logs never hold a key. A presented key is hashed and compared with every stored digest by
`hmac.compare_digest`, without stopping at the first match, so the time taken says nothing about which or how many
bytes matched.

Rate limits are token buckets per key, kept in each ingress replica: with N ingress replicas a key gets at most N
times the configured rate (the limit protects the engine from one client; it is not a billing meter).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pipelines.serve_schemas import ApiError

API_KEYS_ENV = "TOOLSEEK_API_KEYS"
ADMIN_KEYS_ENV = "TOOLSEEK_ADMIN_KEYS"
MIN_KEY_CHARS = 16


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def read_keys(path: str | os.PathLike | None, env_var: str, what: str) -> list[str]:
    """Keys from a file (one per line, `#` comments and blank lines skipped) and from `env_var` (comma-separated).

    A key shorter than MIN_KEY_CHARS is refused with its line named: short keys can be guessed.
    """
    keys: list[tuple[str, str]] = []
    if path:
        file = Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"serve.{what}_file={str(path)!r} is not a file")
        for number, line in enumerate(file.read_text().splitlines(), 1):
            line = line.strip()
            if line and not line.startswith("#"):
                keys.append((line, f"{path}:{number}"))
    for index, value in enumerate(os.environ.get(env_var, "").split(",")):
        if value.strip():
            keys.append((value.strip(), f"{env_var}[{index}]"))
    for key, where in keys:
        if len(key) < MIN_KEY_CHARS or any(c.isspace() for c in key):
            raise ValueError(f"{what} at {where}: a key needs at least {MIN_KEY_CHARS} characters and no spaces")
    return [key for key, _ in keys]


class KeyRing:
    """Digests of the accepted keys; `match` answers which one a presented key is (by its digest), in constant time."""

    def __init__(self, digests: Iterable[str]):
        self.digests = list(digests)

    def match(self, presented: str | None) -> str | None:
        if not presented:
            return None
        candidate = digest(presented)
        found = None
        for stored in self.digests:  # every digest is compared, whatever matched before
            if hmac.compare_digest(candidate, stored):
                found = stored
        return found


def bearer_token(authorization: str | None) -> str | None:
    """The key of an `Authorization: Bearer <key>` header (scheme case-insensitive), else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def authenticate(ring: KeyRing, authorization: str | None, required: bool, admin: bool = False) -> str:
    """The caller's key id (a digest prefix, safe to log), or a 401 that names what was wrong."""
    if not required:
        return "anonymous"
    token = bearer_token(authorization)
    if token is None:
        raise ApiError(401, "missing API key: send `Authorization: Bearer <key>`", None, "missing_api_key",
                       {"WWW-Authenticate": "Bearer"})  # fmt: skip
    found = ring.match(token)
    if found is None:
        what = "admin key" if admin else "API key"
        raise ApiError(401, f"invalid {what}", None, "invalid_api_key", {"WWW-Authenticate": "Bearer"})
    return found[:12]


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per key: `per_minute` tokens a minute, at most `burst` saved up; 0 per minute = no limit."""

    per_minute: int
    burst: int
    clock: object = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, key_id: str) -> None:
        """Take one token for `key_id`, or raise 429 with the seconds until one is free (Retry-After)."""
        if self.per_minute <= 0:
            return
        rate = self.per_minute / 60.0
        capacity = max(1, self.burst)
        now = self.clock()
        with self._lock:
            bucket = self._buckets.setdefault(key_id, _Bucket(float(capacity), now))
            bucket.tokens = min(capacity, bucket.tokens + (now - bucket.updated) * rate)
            bucket.updated = now
            if bucket.tokens < 1:
                wait = (1 - bucket.tokens) / rate
                raise ApiError(429, f"rate limit of {self.per_minute} requests per minute reached; retry in "
                               f"{wait:.1f}s", None, "rate_limit_exceeded",
                               {"Retry-After": str(max(1, math.ceil(wait)))})  # fmt: skip
            bucket.tokens -= 1


class BodySizeLimit:
    """ASGI middleware: a body larger than `max_bytes` gets 413 before any of it is parsed.

    The declared Content-Length is checked first; a body without one (chunked) is read up to the limit and then
    handed on whole, so an endless upload costs at most `max_bytes` of memory.
    """

    def __init__(self, app, max_bytes: int, render):
        self.app, self.max_bytes, self.render = app, max_bytes, render

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = ApiError(413, f"request body exceeds serve.max_request_bytes={self.max_bytes}", None,
                             "request_too_large")  # fmt: skip
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return await self.render(too_large)(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nothing to answer
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self.render(too_large)(scope, receive, send)
            if not message.get("more_body", False):
                break
        body, delivered = b"".join(chunks), False

        async def replay():
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await self.app(scope, replay, send)

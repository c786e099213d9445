"""Request limits of the worklist app: failed logins per username and per client address, and the body size cap.

The login limiter lives in memory, one per app (so per process): with N API processes or replicas a username gets
up to N times CXR_LOGIN_MAX_FAILURES guesses per window. It needs no table and forgets everything on restart.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fastapi import HTTPException, status
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# Keys kept at most (usernames and addresses with failures in the window); beyond it the oldest are forgotten, so a
# spray of made-up usernames cannot grow the process without bound.
MAX_KEYS = 100_000


@dataclass(frozen=True)
class Lockout:
    """A refused attempt: which count is full ("username" or "address") and when to come back."""

    scope: str
    retry_after_s: int


@dataclass(frozen=True)
class Attempt:
    """An admitted attempt. It counts as a failure from the start (concurrent guesses cannot overrun the limit)
    until `LoginLimiter.succeeded` or `LoginLimiter.cancel` takes it back."""

    username: str
    address: str
    at: float


class LoginLimiter:
    """Failed logins in a sliding window: a key with `max_failures` failures in the last `window_s` seconds is
    refused (429) until the oldest of them leaves the window. A successful login clears the username's count."""

    def __init__(
        self,
        max_failures: int,
        window_s: float,
        *,
        max_failures_per_address: int = 0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.limits = {"username": max_failures, "address": max_failures_per_address or max_failures}
        self.window_s = window_s
        self.clock = clock
        self.max_keys = max_keys
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    def begin(self, username: str, address: str) -> Attempt | Lockout:
        """Admit an attempt (counted as failed until told otherwise) or refuse it with the time to wait."""
        with self._lock:
            now = self.clock()
            self._sweep(now)
            keys = (("username", username), ("address", address))
            for key in keys:
                lockout = self._lockout(key, now)
                if lockout is not None:
                    return lockout
            for key in keys:
                self._failures.setdefault(key, deque()).append(now)
            return Attempt(username, address, now)

    def failed(self, attempt: Attempt) -> list[Lockout]:
        """The password was wrong (already counted): the counts that are now full, if any."""
        with self._lock:
            now = self.clock()
            keys = (("username", attempt.username), ("address", attempt.address))
            return [lockout for key in keys if (lockout := self._lockout(key, now)) is not None]

    def succeeded(self, attempt: Attempt) -> None:
        """The password was right: the username starts again from zero; the address keeps its earlier failures."""
        with self._lock:
            self._failures.pop(("username", attempt.username), None)
            self._take_back(("address", attempt.address), attempt.at)

    def cancel(self, attempt: Attempt) -> None:
        """The attempt ended in an error of ours (say the database was down): it is not a failed login."""
        with self._lock:
            self._take_back(("username", attempt.username), attempt.at)
            self._take_back(("address", attempt.address), attempt.at)

    def _take_back(self, key: tuple[str, str], at: float) -> None:
        stamps = self._failures.get(key)
        if stamps is None:
            return
        if at in stamps:
            stamps.remove(at)
        if not stamps:
            del self._failures[key]

    def _lockout(self, key: tuple[str, str], now: float) -> Lockout | None:
        """A full count: refused until the oldest failure that fills it leaves the window."""
        stamps = self._current(key, now)
        limit = self.limits[key[0]]
        if stamps is None or len(stamps) < limit:
            return None
        return Lockout(key[0], max(1, math.ceil(stamps[len(stamps) - limit] + self.window_s - now)))

    def _current(self, key: tuple[str, str], now: float) -> deque[float] | None:
        stamps = self._failures.get(key)
        if stamps is None:
            return None
        while stamps and stamps[0] <= now - self.window_s:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
            return None
        return stamps

    def _sweep(self, now: float) -> None:
        """Once a window, forget keys whose failures have all expired; and keep room for the two keys of a new
        attempt by forgetting the oldest keys (under a spray of made-up usernames)."""
        if now - self._last_sweep >= self.window_s:
            self._last_sweep = now
            for key in list(self._failures):
                self._current(key, now)
        excess = len(self._failures) - (self.max_keys - 2)
        if excess > 0:
            for key in list(itertools.islice(self._failures, excess)):
                del self._failures[key]


class RequestTooLarge(HTTPException):
    """Raised from `receive` once a body without (or beyond) its Content-Length passes the cap; FastAPI passes an
    HTTPException raised while reading the body through, so it becomes a 413 answer, not a 400."""

    def __init__(self, max_bytes: int) -> None:
        super().__init__(status.HTTP_413_CONTENT_TOO_LARGE, f"request body larger than {max_bytes} bytes")


class BodySizeLimit:
    """ASGI middleware: 413 for a declared Content-Length above the cap before any of the body is read, and a
    stop (413) as soon as a chunked body passes it. The cap is `max_bytes`, or for a path under one of
    `prefix_limits` that prefix's own (STOW-RS bodies under /dicomweb/ carry whole studies)."""

    def __init__(self, app: ASGIApp, max_bytes: int, *, prefix_limits: Mapping[str, int] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.prefix_limits = dict(prefix_limits or {})

    def cap(self, path: str) -> int:
        """The cap of a request to `path`."""
        return next((cap for prefix, cap in self.prefix_limits.items() if path.startswith(prefix)), self.max_bytes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.cap(scope.get("path", ""))
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            try:
                too_large = int(declared) > max_bytes
            except ValueError:
                await JSONResponse({"detail": "invalid Content-Length"}, status_code=400)(scope, receive, send)
                return
            if too_large:
                await self._refuse(scope, receive, send, max_bytes)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > max_bytes:
                    raise RequestTooLarge(max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except RequestTooLarge:
            # Raised where no exception handler turned it into an answer (a middleware reading the body).
            if started:
                raise
            await self._refuse(scope, receive, send, max_bytes)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, max_bytes: int) -> None:
        detail = f"request body larger than {max_bytes} bytes"
        response = JSONResponse({"detail": detail}, status_code=413, headers={"Connection": "close"})
        await response(scope, receive, send)

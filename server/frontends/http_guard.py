"""The HTTP front end's guard (pure ASGI, in front of the app): API keys and per-key
limits, the body-size cap and the request deadline.

- ``/healthz`` and ``/readyz`` are always open (the kubelet has no key);
  ``/metrics`` needs a key with the ``metrics`` scope only when the keys file
  says so (``--metrics-auth``); ``/v1/models`` needs ``read``; the generation
  endpoints need ``generate``. No key or an unknown one: 401 with
  ``WWW-Authenticate: Bearer``; a key without the scope: 403; over a limit:
  429 with ``Retry-After``.
- A body longer than ``max_body_bytes`` is refused with 413 naming ``body``,
  from its Content-Length before it is read, or as soon as a chunked body
  passes the cap.
- ``request_timeout_s`` bounds a whole exchange: one that has not started
  its answer by then gets 504; a stream that runs past it is ended (and its
  engine requests aborted).

Every refusal here is counted in ``autoglm_requests_total`` (and per key).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from autoglm_server.errors import AutoGLMError, DeadlineExceededError, InvalidRequestError
from autoglm_server.frontend import ServerState
from autoglm_server.security.keys import KeyGuard, bearer, current_ticket

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024
OPEN_PATHS = frozenset({"/healthz", "/readyz"})
_STATUS_CODES = {
    200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
    404: "NOT_FOUND", 413: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 499: "CANCELLED",
    503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED",
}  # fmt: skip


class BodyTooLargeError(InvalidRequestError):
    http_status = 413

    def __init__(self, limit: int) -> None:
        super().__init__("body", f"is larger than {limit} bytes")


def http_scope(path: str, protect_metrics: bool) -> str | None:
    """The key scope a path needs; None: open."""
    if path in OPEN_PATHS:
        return None
    if path == "/metrics":
        return "metrics" if protect_metrics else None
    if path in ("/v1/completions", "/v1/chat/completions"):
        return "generate"
    return "read"


class HttpGuard:
    """ASGI middleware: ``HttpGuard(app, state=..., respond=...)``."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: ServerState,
        respond: Callable[[Exception, str], JSONResponse],
        keys: KeyGuard | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        request_timeout_s: float | None = None,
    ) -> None:
        self.app = app
        self.state = state
        self.respond = respond
        self.keys = keys
        self.max_body_bytes = max_body_bytes
        self.request_timeout_s = request_timeout_s or None

    async def _refuse(self, exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        self.state.record_rejection(exc)
        response = self.respond(exc, scope["path"])
        if getattr(exc, "http_status", None) == 401:
            response.headers["WWW-Authenticate"] = 'Bearer realm="autoglm"'
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        headers = {k.decode("latin-1").lower(): v for k, v in scope.get("headers", ())}
        ticket = None
        needed = http_scope(path, self.keys.protect_metrics if self.keys else False)
        if self.keys is not None and needed is not None:
            raw = headers.get("authorization")
            token = bearer(raw.decode("latin-1")) if raw is not None else None
            try:
                ticket = self.keys.admit(token, needed)
            except AutoGLMError as exc:
                await self._refuse(exc, scope, receive, send)
                return
            current_ticket.set(ticket)
        status: list[int] = []
        try:
            length = headers.get("content-length")
            if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
                raise BodyTooLargeError(self.max_body_bytes)

            async def send_status(message: Message) -> None:
                if message["type"] == "http.response.start":
                    status.append(int(message["status"]))
                await send(message)

            run = self.app(scope, self._capped(receive), send_status)
            if self.request_timeout_s is None:
                await run
            else:
                try:
                    async with asyncio.timeout(self.request_timeout_s):
                        await run
                except TimeoutError:
                    if not status:
                        raise DeadlineExceededError(
                            f"the request took longer than {self.request_timeout_s:g} s"
                        ) from None
        except AutoGLMError as exc:
            if status:
                raise
            status.append(exc.http_status)
            await self._refuse(exc, scope, receive, send)
        finally:
            if ticket is not None:
                code = _STATUS_CODES.get(status[0] if status else 499, "INTERNAL")
                ticket.release(code)

    def _capped(self, receive: Receive) -> Receive:
        limit = self.max_body_bytes
        seen = 0

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLargeError(limit)
            return message

        return capped

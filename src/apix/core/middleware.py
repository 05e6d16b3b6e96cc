"""Pure ASGI middleware: request ids, one access log line, body limit, last-resort 500,
and the observers told of every answered request (latency metrics, API-key usage).

Kept as raw ASGI (not `BaseHTTPMiddleware`) so streaming responses and WebSockets pass
through untouched and the per-request cost stays a few attribute lookups. One layer does
all of it: each further layer would wrap every message of every request again.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence

import structlog
from fastapi import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from apix.core.errors import TooLarge, error_content
from apix.core.json import dumps
from apix.core.logging import get_logger

log = get_logger("apix.http")
# The standard library logger under `log`: asked for its level whatever structlog wraps it in.
_stdlib_log = logging.getLogger("apix.http")

REQUEST_ID_HEADER = b"x-request-id"
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


class _BodyTooLarge(HTTPException):
    """Raised from ``receive``; FastAPI re-raises HTTP exceptions met while reading a body."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} bytes")


# Told of each HTTP request once it is answered: its scope (with `route` when routing
# matched one), the status and the seconds it took. The status is the one sent, except
# that a request whose app failed counts as 500 even if a response had started; a body
# refused as too large (413) before any routing is `unmatched` in the latency metrics.
OnResponse = Callable[[Scope, int, float], None]


class RequestContextMiddleware:
    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, on_response: Sequence[OnResponse] = ()
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.on_response = tuple(on_response)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = _request_id(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        status = 500
        response_started = False
        header_value = request_id.encode()

        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send_error(send, 413, TooLarge.code, _too_large_message(self), header_value)
            self._answered(scope, 413, started)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise _BodyTooLarge(self.max_body_bytes)
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status = message["status"]
                response_started = True
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, header_value),
                ]
            await send(message)

        try:
            await self.app(scope, limited_receive, send_with_id)
        except _BodyTooLarge:
            status = 413
            if not response_started:
                await _send_error(send, 413, TooLarge.code, _too_large_message(self), header_value)
        except Exception:
            status = 500
            log.exception("unhandled error", method=scope["method"], path=scope["path"])
            if not response_started:
                await _send_error(
                    send,
                    500,
                    "internal",
                    "internal server error",
                    header_value,
                    details={"request_id": request_id},
                )
        finally:
            self._answered(scope, status, started)

    def _answered(self, scope: Scope, status: int, started: float) -> None:
        seconds = time.perf_counter() - started
        if _stdlib_log.isEnabledFor(logging.INFO):
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round(seconds * 1000, 3),
            )
        for observe in self.on_response:
            try:
                observe(scope, status, seconds)
            except Exception:  # the answer is sent: a failing observer costs only its record
                log.exception("a response observer failed", observer=repr(observe))


def _request_id(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and _VALID_REQUEST_ID.match(value):
            return str(value.decode())
    return os.urandom(16).hex()  # 128 random bits, as a uuid4's hex without its cost


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large_message(middleware: RequestContextMiddleware) -> str:
    return f"request body larger than {middleware.max_body_bytes} bytes"


async def _send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    request_id: bytes,
    details: object = None,
) -> None:
    body = dumps(error_content(code, message, details))
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (REQUEST_ID_HEADER, request_id),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})

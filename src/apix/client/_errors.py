"""Typed errors of the APIX client: one class per protocol error code, plus connection loss.

Error replies carry a code (PROTOCOL.md section 2); `error_from` maps it to its class so an
application can catch `Forbidden` rather than compare strings.
"""

from __future__ import annotations

from typing import ClassVar


class ApixError(Exception):
    """An error reply from the gateway, or the connection failing: ``code`` and ``message``."""

    default_code: ClassVar[str] = "internal"

    def __init__(self, code: str | None = None, message: str = "") -> None:
        self.code = code or self.default_code
        self.message = message or self.code
        super().__init__(f"{self.code}: {self.message}")


class BadRequest(ApixError):
    default_code = "bad_request"


class Unauthorized(ApixError):
    default_code = "unauthorized"


class TokenExpired(Unauthorized):
    default_code = "token_expired"


class Forbidden(ApixError):
    default_code = "forbidden"


class NotFound(ApixError):
    default_code = "not_found"


class RateLimited(ApixError):
    default_code = "rate_limited"


class TooLarge(ApixError):
    default_code = "too_large"


class Conflict(ApixError):
    default_code = "conflict"


class Unrecoverable(ApixError):
    default_code = "unrecoverable"


class InternalError(ApixError):
    default_code = "internal"


class ConnectionLost(ApixError):
    """The socket dropped while a command waited for its reply; the client is reconnecting.

    Whether the command took effect is unknown: retry only what is safe to repeat (a
    publish with an ``idempotency_key`` is).
    """

    default_code = "connection_lost"


class ConnectionClosed(ApixError):
    """The client is closed for good: by the application, or by a close code that forbids
    reconnecting (PROTOCOL.md section 9), kept in ``close_code`` with its ``reason``."""

    default_code = "connection_closed"

    def __init__(
        self, close_code: int | None, reason: str = "", *, code: str | None = None
    ) -> None:
        self.close_code = close_code
        self.reason = reason
        described = f"closed with {close_code}" if close_code is not None else "closed"
        super().__init__(code, f"{described}: {reason}" if reason else described)


_BY_CODE: dict[str, type[ApixError]] = {
    cls.default_code: cls
    for cls in (
        BadRequest,
        Unauthorized,
        TokenExpired,
        Forbidden,
        NotFound,
        RateLimited,
        TooLarge,
        Conflict,
        Unrecoverable,
        InternalError,
    )
}


def error_from(payload: object) -> ApixError:
    """The typed error for an error reply's ``error`` object."""
    if not isinstance(payload, dict):
        return InternalError(message="malformed error reply")
    code = str(payload.get("code") or "internal")
    message = str(payload.get("message") or code)
    return _BY_CODE.get(code, ApixError)(code, message)

"""Render every HTTP error as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import asyncpg
import redis.exceptions
import sqlalchemy.exc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from apix.core.errors import AppError, error_content
from apix.core.json import ORJSONResponse
from apix.core.logging import get_logger

log = get_logger(__name__)

_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    429: "rate_limited",
    503: "unavailable",
}


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(AppError, _app_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    for outage in BACKEND_OUTAGES:
        app.add_exception_handler(outage, _backend_unavailable)


# A database or Redis that cannot be reached is a server-side outage, not a bug: 503, so
# clients retry; the pools reconnect by themselves once the server is back.
BACKEND_OUTAGES: tuple[type[Exception], ...] = (
    sqlalchemy.exc.DBAPIError,
    sqlalchemy.exc.TimeoutError,  # no pooled connection in time
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    ConnectionError,
    TimeoutError,
    # Connecting to a server that is down over a unix socket (the embedded PostgreSQL) is a
    # FileNotFoundError, which SQLAlchemy passes through untranslated.
    OSError,
)
_LOST_CONNECTION = (
    asyncpg.exceptions.PostgresConnectionError,  # incl. "cannot connect now" (starting up)
    asyncpg.exceptions.InterfaceError,
    ConnectionError,
    OSError,
)


async def _backend_unavailable(request: Request, exc: Exception) -> ORJSONResponse:
    if isinstance(exc, sqlalchemy.exc.DBAPIError) and not (
        exc.connection_invalidated or isinstance(exc.orig, _LOST_CONNECTION)
    ):
        raise exc  # a real database error: the last-resort handler answers 500
    log.warning("backend unavailable", path=request.url.path, error=type(exc).__name__)
    return ORJSONResponse(
        error_content("unavailable", "a backing service is unavailable; retry shortly"),
        status_code=503,
        headers={"Retry-After": "1"},
    )


async def _app_error(_request: Request, exc: AppError) -> ORJSONResponse:
    return ORJSONResponse(
        error_content(exc.code, exc.message, exc.details),
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _validation_error(_request: Request, exc: RequestValidationError) -> ORJSONResponse:
    errors = [_field_error(e) for e in exc.errors()]
    if any(e["type"] == "json_invalid" for e in errors):
        return ORJSONResponse(
            error_content("malformed_json", "the request body is not valid JSON", errors),
            status_code=400,
        )
    return ORJSONResponse(
        error_content("validation_error", "the request is not valid", errors), status_code=422
    )


def _field_error(error: Any) -> dict[str, Any]:
    return {
        "loc": [str(part) for part in error.get("loc", ())],
        "message": error.get("msg", ""),
        "type": error.get("type", ""),
    }


async def _http_error(_request: Request, exc: StarletteHTTPException) -> ORJSONResponse:
    code = _CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else HTTPStatus(exc.status_code).phrase
    if exc.status_code == 404 and message == "Not Found":
        message = "no such resource"
    if exc.status_code == 405 and message == "Method Not Allowed":
        message = "method not allowed on this resource"
    return ORJSONResponse(
        error_content(code, message), status_code=exc.status_code, headers=exc.headers
    )

"""Render every HTTP error as ``{"error": {"code", "message", "details"}}``."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from apix.core.errors import AppError, error_content
from apix.core.json import ORJSONResponse

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

"""Domain errors and the one error shape every HTTP error uses.

Services raise subclasses of `AppError`; `apix.app` renders them (and framework errors) as
``{"error": {"code", "message", "details"}}``. Services never raise `HTTPException`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel


class AppError(Exception):
    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    message: str = "bad request"

    def __init__(
        self,
        message: str | None = None,
        *,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.message = message or type(self).message
        self.details = details
        self.headers = headers
        super().__init__(self.message)


class BadRequest(AppError):
    pass


class Unauthorized(AppError):
    status_code = 401
    code = "unauthorized"
    message = "authentication required"


class Forbidden(AppError):
    status_code = 403
    code = "forbidden"
    message = "not allowed"


class NotFound(AppError):
    status_code = 404
    code = "not_found"
    message = "not found"


class Conflict(AppError):
    status_code = 409
    code = "conflict"
    message = "conflict"


class TooLarge(AppError):
    status_code = 413
    code = "too_large"
    message = "request body too large"


class RateLimited(AppError):
    status_code = 429
    code = "rate_limited"
    message = "too many requests"


class Unavailable(AppError):
    status_code = 503
    code = "unavailable"
    message = "service unavailable"


class ErrorBody(BaseModel):
    code: str
    message: str
    details: Any = None


class ErrorResponse(BaseModel):
    """The body of every HTTP error."""

    error: ErrorBody


def error_content(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}

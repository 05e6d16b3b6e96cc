"""Errors of the providers domain: configuration errors and providers' typed call errors.

A call error says whether the call may be retried (and failed over) and whether it counts
against the provider's health; the adapters map every SDK exception to one of them.
"""

from __future__ import annotations

from typing import Any, ClassVar

from apix.core.errors import AppError, BadRequest, Conflict, NotFound, Unavailable


class ProviderNotFound(NotFound):
    code = "provider_not_found"
    message = "no such provider"


class ProviderNameTaken(Conflict):
    code = "provider_name_taken"
    message = "a provider with this name already exists"


class InvalidFallbackChain(BadRequest):
    code = "invalid_fallback_chain"
    message = "the fallback chain is not valid"


class NoPrimaryProvider(NotFound):
    code = "no_primary_provider"
    message = "the organization has no primary provider"


class NoProviderAvailable(Unavailable):
    code = "no_provider_available"
    message = "no provider could answer"


class ProviderCallError(AppError):
    """A provider's own failure, as the provider (or the network to it) reported it."""

    status_code = 502
    code = "provider_error"
    message = "the provider failed"
    retryable: ClassVar[bool] = False
    counts_against_health: ClassVar[bool] = True

    def __init__(
        self,
        message: str | None = None,
        *,
        provider_status: int | None = None,
        details: Any = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        # Provider messages are their own text; keep them short in responses and events.
        super().__init__(message[:500] if message else None, details=details, headers=headers)
        self.provider_status = provider_status


class ProviderAuthError(ProviderCallError):
    code = "provider_auth_error"
    message = "the provider refused the credentials"
    counts_against_health = False


class ProviderBadRequest(ProviderCallError):
    status_code = 400
    code = "provider_bad_request"
    message = "the provider refused the request"
    counts_against_health = False


class ProviderRateLimited(ProviderCallError):
    status_code = 429
    code = "provider_rate_limited"
    message = "the provider is rate limiting"
    retryable = True


class ProviderUnavailable(ProviderCallError):
    status_code = 503
    code = "provider_unavailable"
    message = "the provider is unavailable"
    retryable = True


class ProviderTimeout(ProviderUnavailable):
    status_code = 504
    code = "provider_timeout"
    message = "the provider did not answer in time"


class PriceNotFound(NotFound):
    code = "price_not_found"
    message = "the organization has no own price for this model"

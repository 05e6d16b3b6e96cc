"""Request dependencies: the caller's `Principal`, permission guards, request metadata."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request

from apix.audit.service import RequestMeta
from apix.core.errors import Forbidden, Unauthorized
from apix.identity import service
from apix.identity.principal import Principal
from apix.identity.runtime import IdentityRuntime


async def _runtime(request: Request) -> IdentityRuntime:
    runtime: IdentityRuntime = request.app.state.identity
    return runtime


async def _meta(request: Request) -> RequestMeta:
    return RequestMeta(
        ip=request.client.host if request.client else None,
        user_agent=request.headers.get("user-agent"),
        request_id=request.scope.get("state", {}).get("request_id"),
    )


def credential_from(request: Request) -> str | None:
    """The bearer token or API key a request carries (`Authorization` or `X-API-Key`)."""
    header = request.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return request.headers.get("x-api-key") or None


async def _principal(request: Request, runtime: Runtime) -> Principal:
    credential = credential_from(request)
    if credential is None:
        raise Unauthorized("a bearer token or API key is required")
    principal = await service.authenticate(runtime, credential)
    if principal.api_key_id is not None and principal.org_id is not None:
        # Counted per key by the access middleware once the response is sent (analytics).
        request.state.api_key = (principal.org_id, principal.api_key_id)
    return principal


Runtime = Annotated[IdentityRuntime, Depends(_runtime)]
Meta = Annotated[RequestMeta, Depends(_meta)]
CurrentPrincipal = Annotated[Principal, Depends(_principal)]


def require(permission: str) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency admitting principals that hold ``permission`` (in an organisation, except
    for `platform:*` permissions, which a SUPER_ADMIN holds without one).

    Use as ``principal: Annotated[Principal, Depends(require("members:write"))]``.
    """

    async def guard(principal: CurrentPrincipal) -> Principal:
        if not principal.can(permission):
            raise Forbidden(f"missing permission {permission}")
        if principal.org_id is None and not permission.startswith("platform:"):
            raise Forbidden("this operation needs an organization; switch to one first")
        return principal

    guard.__name__ = f"require_{permission.replace(':', '_')}"
    return guard

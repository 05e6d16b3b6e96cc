"""Provider endpoints (`/api/v1/providers`) and usage roll-ups and prices (`/api/v1/usage`)."""

from __future__ import annotations

import re
import uuid
from datetime import date
from typing import Annotated, Any

from fastapi import Depends, Path, Query, Response, status
from pydantic import BeforeValidator

from apix.core.errors import ErrorResponse
from apix.core.routing import api_router
from apix.identity.deps import Meta, require
from apix.identity.principal import Principal
from apix.providers import service
from apix.providers.deps import Runtime
from apix.providers.schemas import (
    CompletionRequest,
    CompletionResult,
    PriceRead,
    PriceSet,
    ProviderCreate,
    ProviderRead,
    ProviderTestRequest,
    ProviderTestResult,
    ProviderUpdate,
    UsageDimension,
    UsageReport,
)

_ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}


def _iso_day(value: object) -> object:
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError("a day is written YYYY-MM-DD")
    return value


_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")

router = api_router(prefix="/api/v1", tags=["providers"], responses=_ERRORS)

Reader = Annotated[Principal, Depends(require("providers:read"))]
User = Annotated[Principal, Depends(require("providers:use"))]
Admin = Annotated[Principal, Depends(require("providers:write"))]
_PRINTABLE = r"^[^\x00-\x1f\x7f]+$"
ModelPath = Annotated[str, Path(min_length=1, max_length=200, pattern=_PRINTABLE)]
GroupBy = Annotated[list[UsageDimension] | None, Query()]
# A calendar day written as one (pydantic would otherwise read `0.0` as 1970-01-01).
Day = Annotated[date, Query(), BeforeValidator(_iso_day)]
_NO_CONTENT = status.HTTP_204_NO_CONTENT
_CALL_ERRORS: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorResponse},
    502: {"model": ErrorResponse},
    503: {"model": ErrorResponse},
    504: {"model": ErrorResponse},
}


@router.get("/providers")
async def list_providers(principal: Reader, runtime: Runtime) -> list[ProviderRead]:
    """The organisation's providers with their health (never their keys)."""
    return await service.list_providers(runtime, principal)


@router.post(
    "/providers", status_code=status.HTTP_201_CREATED, responses={409: {"model": ErrorResponse}}
)
async def create_provider(
    data: ProviderCreate, principal: Admin, runtime: Runtime, meta: Meta
) -> ProviderRead:
    """Add a provider; its API key is stored encrypted and never shown again."""
    return await service.create(runtime, principal, data, meta)


@router.post("/providers/completions", responses=_CALL_ERRORS)
async def complete(data: CompletionRequest, principal: User, runtime: Runtime) -> CompletionResult:
    """A chat completion through routing: retries, failover (as hops), usage metering."""
    return await service.complete(runtime, principal, data)


@router.get("/providers/{provider_id}")
async def get_provider(provider_id: uuid.UUID, principal: Reader, runtime: Runtime) -> ProviderRead:
    """One provider with its health."""
    return await service.get(runtime, principal, provider_id)


@router.patch("/providers/{provider_id}", responses={409: {"model": ErrorResponse}})
async def update_provider(
    provider_id: uuid.UUID, data: ProviderUpdate, principal: Admin, runtime: Runtime, meta: Meta
) -> ProviderRead:
    """Change a provider; `api_key: null` removes its key."""
    return await service.update_provider(runtime, principal, provider_id, data, meta)


@router.delete("/providers/{provider_id}", status_code=_NO_CONTENT)
async def delete_provider(
    provider_id: uuid.UUID, principal: Admin, runtime: Runtime, meta: Meta
) -> Response:
    """Delete a provider (it leaves other providers' fallback chains; its usage stays)."""
    await service.delete_provider(runtime, principal, provider_id, meta)
    return Response(status_code=_NO_CONTENT)


@router.post("/providers/{provider_id}/test")
async def try_provider(
    provider_id: uuid.UUID,
    principal: User,
    runtime: Runtime,
    data: ProviderTestRequest | None = None,
) -> ProviderTestResult:
    """Call the provider once with a tiny prompt: latency and reply, or its typed error."""
    return await service.try_provider(
        runtime, principal, provider_id, data or ProviderTestRequest()
    )


@router.get("/providers/{provider_id}/usage")
async def provider_usage(
    provider_id: uuid.UUID,
    principal: Reader,
    runtime: Runtime,
    since: Day | None = None,
    until: Day | None = None,
    group_by: GroupBy = None,
) -> UsageReport:
    """This provider's calls, tokens and cost, per day and model by default."""
    return await service.usage_report(
        runtime,
        principal,
        since=since,
        until=until,
        group_by=group_by or ["day", "model"],
        provider_id=provider_id,
    )


@router.get("/usage")
async def usage(
    principal: Reader,
    runtime: Runtime,
    since: Day | None = None,
    until: Day | None = None,
    group_by: GroupBy = None,
    provider_id: uuid.UUID | None = None,
    agent_id: uuid.UUID | None = None,
    model: Annotated[str | None, Query(max_length=200, pattern=_PRINTABLE)] = None,
) -> UsageReport:
    """The organisation's calls, tokens and cost, per day, provider, agent and model."""
    return await service.usage_report(
        runtime,
        principal,
        since=since,
        until=until,
        group_by=group_by or ["day", "provider", "agent", "model"],
        provider_id=provider_id,
        agent_id=agent_id,
        model=model,
    )


@router.get("/usage/prices")
async def list_prices(principal: Reader, runtime: Runtime) -> list[PriceRead]:
    """The price table in force: the settings' table with the organisation's own prices."""
    return await service.list_prices(runtime, principal)


@router.put("/usage/prices/{model:path}")
async def set_price(
    model: ModelPath, data: PriceSet, principal: Admin, runtime: Runtime, meta: Meta
) -> PriceRead:
    """Set the organisation's own price for a model (or model-name prefix)."""
    return await service.set_price(runtime, principal, model, data, meta)


@router.delete("/usage/prices/{model:path}", status_code=_NO_CONTENT)
async def delete_price(
    model: ModelPath, principal: Admin, runtime: Runtime, meta: Meta
) -> Response:
    """Remove the organisation's own price for a model; the settings' price applies again."""
    await service.delete_price(runtime, principal, model, meta)
    return Response(status_code=_NO_CONTENT)

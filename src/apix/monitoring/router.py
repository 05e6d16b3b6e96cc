"""`/api/v1/monitoring` (ORG_ADMIN+, organisation-scoped; SUPER_ADMIN: the platform) and
`GET /metrics` (Prometheus, behind a bearer token)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from apix.core.errors import ErrorResponse, NotFound, Unauthorized
from apix.core.routing import api_router
from apix.identity.deps import CurrentPrincipal, Meta
from apix.infra.deps import SettingsDep
from apix.monitoring import service
from apix.monitoring.deps import Runtime, Scope
from apix.monitoring.histograms import Window
from apix.monitoring.schemas import (
    AlertList,
    AlertState,
    ClientType,
    Dashboard,
    Health,
    LatencyStats,
    ThresholdOut,
    ThresholdUpdate,
)
from apix.realtime.channels import NAMESPACES

_ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}
router = api_router(prefix="/api/v1/monitoring", tags=["monitoring"], responses=_ERRORS)
metrics_router = api_router(tags=["monitoring"])

NamespaceQuery = Annotated[str | None, Query(pattern="^(" + "|".join(sorted(NAMESPACES)) + ")$")]


@router.get("/latency/stats")
async def latency_stats(
    runtime: Runtime,
    scope: Scope,
    window: Window = Window.ONE_MINUTE,
    namespace: NamespaceQuery = None,
    client_type: ClientType | None = None,
) -> LatencyStats:
    """Latency percentiles over a rolling window, merged across every node."""
    return await service.stats(
        runtime, scope, window=window, namespace=namespace, client_type=client_type
    )


@router.get("/latency/alerts")
async def latency_alerts(
    runtime: Runtime,
    scope: Scope,
    state: AlertState | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
) -> AlertList:
    """Alert episodes, newest first, firing and resolved."""
    return await service.list_alerts(runtime, scope, state=state, limit=limit)


@router.get("/latency/thresholds")
async def latency_thresholds(runtime: Runtime, scope: Scope) -> list[ThresholdOut]:
    """Each alert rule's threshold: the organisation's override or the platform default."""
    return await service.get_thresholds(runtime, scope)


@router.put("/latency/thresholds/{rule}")
async def set_latency_threshold(
    rule: str,
    data: ThresholdUpdate,
    runtime: Runtime,
    scope: Scope,
    principal: CurrentPrincipal,
    meta: Meta,
) -> ThresholdOut:
    """Override one alert rule for the organisation (null fields: the platform default)."""
    return await service.set_threshold(runtime, scope, rule, data, principal=principal, meta=meta)


@router.get("/latency/dashboard")
async def latency_dashboard(runtime: Runtime, scope: Scope) -> Dashboard:
    """The last hour minute by minute: connections, events, latency, failures, channels."""
    return await service.dashboard(runtime, scope)


@router.get("/latency/health")
async def latency_health(runtime: Runtime, scope: Scope) -> Health:
    """PostgreSQL, Redis, every node, the archive, and an overall status."""
    return await service.health(runtime, scope)


@metrics_router.get("/metrics", response_class=Response, include_in_schema=False)
async def metrics(request: Request, runtime: Runtime, settings: SettingsDep) -> Response:
    """This node's metrics in the Prometheus text format (bearer token)."""
    token = settings.monitoring.metrics_token
    if token is None:
        raise NotFound("metrics are disabled (set APIX_MONITORING__METRICS_TOKEN)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        raise Unauthorized(
            "a valid metrics bearer token is required", headers={"WWW-Authenticate": "Bearer"}
        )
    await runtime.fresh()
    await runtime.refresh_backlog()
    return Response(generate_latest(runtime.metrics.registry), media_type=CONTENT_TYPE_LATEST)

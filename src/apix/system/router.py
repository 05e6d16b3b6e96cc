"""API root, node status, liveness and readiness."""

from __future__ import annotations

from fastapi import Request, Response

from apix import __version__
from apix.core.routing import api_router
from apix.infra.deps import DatabaseDep, RedisDep, SettingsDep
from apix.realtime import archive
from apix.system import service
from apix.system.schemas import (
    ApiLinks,
    ApiRoot,
    ArchiveStatus,
    GatewayStatus,
    Liveness,
    Readiness,
    Status,
)

router = api_router()


@router.get("/api/v1", tags=["system"])
async def api_root(request: Request, settings: SettingsDep) -> ApiRoot:
    """The API root: name, version and where everything is."""
    base = (settings.server.public_url or str(request.base_url)).rstrip("/")
    ws_base = base.replace("https://", "wss://", 1).replace("http://", "ws://", 1)
    return ApiRoot(
        name="APIX",
        version=__version__,
        links=ApiLinks(
            docs=f"{base}/api/docs",
            redoc=f"{base}/api/redoc",
            openapi=f"{base}/api/openapi.json",
            status=f"{base}/api/v1/status",
            websocket=f"{ws_base}/api/v1/apix/ws",
        ),
    )


@router.get("/api/v1/status", tags=["system"])
async def get_status(
    request: Request, settings: SettingsDep, database: DatabaseDep, redis: RedisDep
) -> Status:
    """Version, node, uptime, and the health of PostgreSQL, Redis and the schema."""
    return await _status(request, settings, database, redis)


@router.get("/healthz", tags=["system"])
async def healthz() -> Liveness:
    """Liveness: the process answers. No I/O."""
    return Liveness(status="ok")


@router.get("/readyz", tags=["system"], responses={503: {"model": Readiness}})
async def readyz(
    request: Request,
    response: Response,
    settings: SettingsDep,
    database: DatabaseDep,
    redis: RedisDep,
) -> Readiness:
    """Readiness: 200 once PostgreSQL and Redis answer and migrations are current, else 503."""
    reasons = service.not_ready_reasons(await _status(request, settings, database, redis))
    if reasons:
        response.status_code = 503
    return Readiness(ready=not reasons, reasons=reasons)


async def _status(
    request: Request, settings: SettingsDep, database: DatabaseDep, redis: RedisDep
) -> Status:
    state = request.app.state
    result = await service.status(
        settings,
        database,
        redis,
        started_at=state.started_at,
        head=state.head_revision,
        embedded=state.embedded,
    )
    gateway = getattr(state, "gateway", None)
    if gateway is not None:
        result.gateway = GatewayStatus.model_validate(gateway.stats())
    if result.redis.ok:
        result.archive = ArchiveStatus(
            enabled=settings.worker.archive, **await archive.backlog(redis)
        )
    return result

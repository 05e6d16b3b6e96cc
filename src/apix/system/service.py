"""Health of the node's dependencies, for status and readiness."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from apix import __version__
from apix.config import Settings
from apix.infra import redis as redis_infra
from apix.infra.database import Database
from apix.system.schemas import ComponentStatus, MigrationStatus, Status

# Status and readiness must answer even when a dependency hangs.
CHECK_TIMEOUT_S = 3.0


async def status(
    settings: Settings,
    database: Database,
    redis: Redis,
    *,
    started_at: float,
    head: str | None,
    embedded: frozenset[str],
) -> Status:
    (postgres, revision), redis_status = await asyncio.gather(
        _postgres(database, "postgres" in embedded), _redis(redis, "redis" in embedded)
    )
    migrations = MigrationStatus(current=revision, head=head, up_to_date=revision == head)
    healthy = postgres.ok and redis_status.ok and migrations.up_to_date
    return Status(
        status="ok" if healthy else "degraded",
        version=__version__,
        node_id=settings.node_id,
        uptime_s=round(time.monotonic() - started_at, 3),
        environment=settings.env.value,
        postgres=postgres,
        redis=redis_status,
        migrations=migrations,
    )


def not_ready_reasons(status: Status) -> list[str]:
    reasons = []
    if not status.postgres.ok:
        reasons.append(f"postgres unreachable: {status.postgres.error}")
    if not status.redis.ok:
        reasons.append(f"redis unreachable: {status.redis.error}")
    if status.postgres.ok and not status.migrations.up_to_date:
        reasons.append(
            f"migrations not current: at {status.migrations.current}, "
            f"head is {status.migrations.head} (run `apix migrate upgrade`)"
        )
    return reasons


async def _postgres(database: Database, embedded: bool) -> tuple[ComponentStatus, str | None]:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            result = await database.ping()
    except Exception as exc:
        return ComponentStatus(ok=False, embedded=embedded, error=_describe(exc)), None
    component = ComponentStatus(
        ok=True, embedded=embedded, latency_ms=result["latency_ms"], version=result["version"]
    )
    return component, result["revision"]


async def _redis(client: Redis, embedded: bool) -> ComponentStatus:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            result = await redis_infra.ping(client)
    except Exception as exc:
        return ComponentStatus(ok=False, embedded=embedded, error=_describe(exc))
    return ComponentStatus(
        ok=True, embedded=embedded, latency_ms=result["latency_ms"], version=result["version"]
    )


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__

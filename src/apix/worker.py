"""The background workers: the event archiver and the agent-run runner.

`apix serve` nodes run them in-process unless `worker.embedded` is false; `apix worker`
runs them in a process of their own, to scale and restart apart from the API.
"""

from __future__ import annotations

import asyncio
import os
import signal

from redis.asyncio import Redis

from apix.agents.runner import Runner
from apix.agents.service import AgentsRuntime
from apix.audit.errors import ChainBroken
from apix.audit.retention import prune
from apix.audit.service import organization_ids
from apix.config import Settings
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.infra.database import Database
from apix.infra.redis import create_redis
from apix.providers.checks import check_all
from apix.providers.runtime import ProvidersRuntime
from apix.realtime.archive import Archiver
from apix.realtime.broker import Broker

log = get_logger(__name__)

_CHECKS_LOCK = "apix:provider-checks"  # one worker of the cluster checks per interval
_PRUNE_LOCK = "apix:audit-prune"  # one worker of the cluster prunes per day
_PRUNE_S = 24 * 3600.0


class Workers:
    """Every background worker of one process, started and stopped together."""

    def __init__(
        self, settings: Settings, database: Database, redis: Redis, broker: Broker, *, name: str
    ) -> None:
        self.archiver = (
            Archiver(redis, database, broker, settings.worker, consumer=name)
            if settings.worker.archive
            else None
        )
        self.redis = redis
        self.providers = ProvidersRuntime.create(settings, database, redis, broker)
        self.runner = Runner(
            AgentsRuntime(database, redis, broker),
            self.providers,
            settings.worker,
            consumer=name,
        )
        interval = settings.worker.provider_checks_s
        self.checks = (
            Periodic("apix-provider-checks", interval, self.check_providers) if interval else None
        )
        self.database = database
        self.secret = settings.secret_key.get_secret_value().encode()
        self.audit_prune = Periodic("apix-audit-prune", _PRUNE_S, self.prune_audit)

    async def start(self) -> None:
        if self.archiver is not None:
            await self.archiver.start()
        await self.runner.start()
        if self.checks is not None:
            self.checks.start()
        self.audit_prune.start()

    async def check_providers(self) -> None:
        """Every provider's active health check, by one worker of the cluster per interval."""
        assert self.checks is not None  # noqa: S101
        ttl_ms = int(self.checks.interval * 1000 * 0.9)
        if await self.redis.set(_CHECKS_LOCK, "1", nx=True, px=ttl_ms):
            results = await check_all(self.providers)
            log.info("provider checks", checked=len(results), failed=sum(not r.ok for r in results))

    async def prune_audit(self) -> None:
        """Apply every organisation's audit retention, once a day across the cluster."""
        if not await self.redis.set(_PRUNE_LOCK, "1", nx=True, px=int(_PRUNE_S * 1000 * 0.9)):
            return
        for org_id in [None, *await organization_ids(self.database)]:
            try:
                result = await prune(self.database, org_id, self.secret)
            except ChainBroken as exc:
                # Evidence is never discarded: `apix audit verify` shows the broken link.
                log.error("audit chain broken; not pruned", org_id=str(org_id), error=exc.message)
                continue
            if result["removed"]:
                log.info("audit pruned", org_id=str(org_id), removed=result["removed"])

    async def stop(self) -> None:
        await self.audit_prune.stop()
        if self.checks is not None:
            await self.checks.stop()
        await self.runner.stop()
        if self.archiver is not None:
            await self.archiver.stop()


async def run_worker(settings: Settings, *, consumer: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then hand unfinished work back (leases released)."""
    if settings.database_url is None or settings.redis_url is None:
        raise RuntimeError("the worker needs APIX_DATABASE_URL and APIX_REDIS_URL")
    database = Database(settings.database_url, settings.database)
    redis = create_redis(settings.redis_url, settings.redis)
    name = consumer or f"{settings.node_id}:worker:{os.getpid()}"
    broker = Broker(
        redis,
        source=f"apix-worker:{name}",
        archive=settings.worker.archive,
        count=settings.monitoring.counting,
    )
    workers = Workers(settings, database, redis, broker, name=name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await workers.start()
        log.info("worker started", consumer=name, archive=settings.worker.archive)
        await stop.wait()
    finally:
        log.info("worker stopping", consumer=name)
        await workers.stop()
        await redis.aclose()
        await database.dispose()

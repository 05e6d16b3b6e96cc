"""`apix worker`: the background workers, in a process of their own.

`apix serve` nodes run the same workers in-process unless `worker.embedded` is false; a
dedicated worker process lets them scale and restart apart from the API.
"""

from __future__ import annotations

import asyncio
import os
import signal

from apix.config import Settings
from apix.core.logging import get_logger
from apix.infra.database import Database
from apix.infra.redis import create_redis
from apix.realtime.archive import Archiver
from apix.realtime.broker import Broker

log = get_logger(__name__)


async def run_worker(settings: Settings, *, consumer: str | None = None) -> None:
    """Run until SIGTERM or SIGINT, then hand unfinished work back (leases released)."""
    if settings.database_url is None or settings.redis_url is None:
        raise RuntimeError("the worker needs APIX_DATABASE_URL and APIX_REDIS_URL")
    database = Database(settings.database_url, settings.database)
    redis = create_redis(settings.redis_url, settings.redis)
    name = consumer or f"{settings.node_id}:worker:{os.getpid()}"
    archiver = Archiver(
        redis, database, Broker(redis, source=f"apix-worker:{name}"), settings.worker, consumer=name
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        if settings.worker.archive:
            await archiver.start()
        log.info("worker started", consumer=name, archive=settings.worker.archive)
        await stop.wait()
    finally:
        log.info("worker stopping", consumer=name)
        if settings.worker.archive:
            await archiver.stop()
        await redis.aclose()
        await database.dispose()

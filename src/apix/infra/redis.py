"""Redis: one asyncio pool per process (hiredis parser when installed)."""

from __future__ import annotations

import time
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis

from apix.config import RedisSettings


def create_redis(url: str, settings: RedisSettings) -> Redis:
    # Blocking: past `max_connections` a command waits for a free connection (up to the
    # socket timeout) instead of failing, so a burst of connects queues rather than errors.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
    )
    return Redis.from_pool(pool)


async def ping(client: Redis) -> dict[str, Any]:
    started = time.perf_counter()
    await client.ping()
    latency_ms = (time.perf_counter() - started) * 1000
    info = await client.info("server")
    return {"latency_ms": round(latency_ms, 3), "version": str(info.get("redis_version"))}

"""The monitoring lease belongs to a runtime, not to a process: two apps in one process (one
node id, one pid) never both lead, and the other takes over when the holder stops."""

from __future__ import annotations

import asyncio
import time
from contextlib import AsyncExitStack

from redis.asyncio import Redis

from apix.app import create_app
from apix.config import RedisSettings
from apix.infra.redis import create_redis
from apix.monitoring.runtime import LEASE_KEY, MonitoringRuntime
from tests.conftest import Servers, make_settings
from tests.monitoring.conftest import monitoring_settings


async def _lease_owner(redis: Redis) -> str | None:
    owner = await redis.get(LEASE_KEY)
    return owner.decode() if isinstance(owner, bytes) else owner


async def test_two_runtimes_in_one_process_never_both_lead(servers: Servers) -> None:
    stacks = [AsyncExitStack(), AsyncExitStack()]
    runtimes: list[MonitoringRuntime] = []
    redis = create_redis(servers.redis_url, RedisSettings())  # outlives both apps
    try:
        for stack in stacks:
            # The same node id in the same process: only the runtime tells them apart.
            app = create_app(make_settings(servers, monitoring=monitoring_settings()))
            await stack.enter_async_context(app.router.lifespan_context(app))
            runtimes.append(app.state.monitoring)
        first, second = runtimes
        assert first.process == second.process
        # Several lease rounds (every 0.2 s): one leader throughout, the one Redis names.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            leaders = [r for r in runtimes if r.leader]
            assert len(leaders) == 1, [r.owner for r in leaders]
            assert await _lease_owner(redis) == leaders[0].owner
            await asyncio.sleep(0.05)

        # The holder stops and releases the lease: the other one takes it over at its next
        # round, long before the lease would have expired (5 s).
        (holder,) = [r for r in runtimes if r.leader]
        (other,) = [r for r in runtimes if r is not holder]
        await stacks[runtimes.index(holder)].aclose()
        for _ in range(40):  # 2 s
            if other.leader:
                break
            await asyncio.sleep(0.05)
        assert other.leader
        assert await _lease_owner(redis) == other.owner
    finally:
        for stack in reversed(stacks):
            await stack.aclose()
        await redis.aclose()

"""The redelivery loop asks Redis only when something can be due: an idle node, or one
without `ack` subscriptions, sends it nothing ten times a second. What is due still goes
out. Each gateway process has a set of its own: processes under one node name
(`apix serve --workers N`) each redeliver to their own connections."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
from redis.asyncio import Redis

from tests.conftest import LiveServer, Servers, running_node
from tests.identity.factories import new_org_admin
from tests.realtime.raw import connected


@contextlib.asynccontextmanager
async def _commands_on(redis: Redis, key: str) -> AsyncIterator[list[str]]:
    """Every command any client sends Redis about ``key`` meanwhile (MONITOR)."""
    seen: list[str] = []
    ready = asyncio.Event()

    async def watch() -> None:
        async with redis.monitor() as monitor:
            ready.set()
            async for command in monitor.listen():
                if key in command["command"]:
                    seen.append(command["command"])

    watcher = asyncio.create_task(watch())
    await asyncio.wait_for(ready.wait(), 5)
    await asyncio.sleep(0.1)  # MONITOR is on before the first command we care about
    try:
        yield seen
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await watcher


def _node(
    servers: Servers, node_id: str = "test-node"
) -> contextlib.AbstractAsyncContextManager[tuple[httpx.AsyncClient, LiveServer]]:
    realtime = {"ack_timeout_ms": 300, "max_attempts": 3}
    return running_node(servers, node_id=node_id, realtime=realtime)


def _key(server: LiveServer) -> str:
    key: str = server.app.state.gateway.redelivery.key
    return key


async def test_without_pending_deliveries_the_loop_asks_redis_nothing(
    servers: Servers, redis: Redis
) -> None:
    async with _node(servers) as (_, server):
        async with _commands_on(redis, _key(server)) as seen:
            await asyncio.sleep(1.0)  # ten ticks
        assert seen == []


async def test_processes_under_one_node_name_each_redeliver_to_their_own(
    servers: Servers, redis: Redis
) -> None:
    """Two gateways named alike (as `apix serve --workers 2` runs them), an `ack`
    subscriber on each: both get the event again. With one set per node name, whichever
    process looked first removed the other's entry as "not my connection"."""
    node_id = f"shared-{uuid.uuid4().hex[:8]}"
    async with _node(servers, node_id) as (http, one), _node(servers, node_id) as (_, two):
        assert _key(one) != _key(two)
        admin = await new_org_admin(http)
        async with (
            connected(one.ws, admin.access_token) as first,
            connected(two.ws, admin.access_token) as second,
        ):
            await first.subscribe("room:shared-ack", ack=True)
            await second.subscribe("room:shared-ack", ack=True)
            response = await http.post(
                "/api/v1/apix/channels/room:shared-ack/events",
                headers=admin.headers,
                json={"type": "t", "data": {"n": 1}},
            )
            assert response.status_code == 201
            ttl = -2  # the set exists only while an entry waits in it
            for _ in range(200):
                if (ttl := await redis.ttl(_key(one))) > 0:
                    break
                await asyncio.sleep(0.01)
            assert 0 < ttl <= 86_400  # a crashed process's set does not stay for good
            for raw in (first, second):
                attempts = [e["attempt"] for e in await raw.events(2, timeout=10)]
                assert attempts == [1, 2]


async def test_an_unacknowledged_event_is_still_redelivered_after_an_idle_spell(
    servers: Servers, redis: Redis
) -> None:
    async with _node(servers) as (http, server):
        admin = await new_org_admin(http)
        async with connected(server.ws, admin.access_token) as raw:
            await raw.subscribe("room:idle-ack", ack=True)
            async with _commands_on(redis, _key(server)) as seen:
                await asyncio.sleep(0.5)  # idle: nothing pending, nothing asked
                assert seen == []
                response = await http.post(
                    "/api/v1/apix/channels/room:idle-ack/events",
                    headers=admin.headers,
                    json={"type": "t", "data": {"n": 1}},
                )
                assert response.status_code == 201
                first, again = await raw.events(2, timeout=10)  # never acknowledged
            assert (first["attempt"], again["attempt"]) == (1, 2)
            assert again["offset"] == first["offset"]
            assert any(c.startswith("ZRANGEBYSCORE") for c in seen)

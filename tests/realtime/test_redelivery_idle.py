"""The redelivery loop asks Redis only when something can be due: an idle node, or one
without `ack` subscriptions, sends it nothing ten times a second. What is due still goes
out: a previous run's leftovers at start, and unacknowledged events after the timeout."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import httpx
from redis.asyncio import Redis

from apix.app import create_app
from tests.conftest import LiveServer, Servers, make_settings, serve_app
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


@contextlib.asynccontextmanager
async def _node(
    servers: Servers, node_id: str
) -> AsyncIterator[tuple[httpx.AsyncClient, LiveServer]]:
    """A node of its own (its redelivery set is `apix:redeliver:<node_id>`)."""
    settings = make_settings(
        servers, node_id=node_id, realtime={"ack_timeout_ms": 300, "max_attempts": 3}
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app), serve_app(app, settings) as server:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http, server


def _key(node_id: str) -> str:
    return f"apix:redeliver:{node_id}"


async def test_without_pending_deliveries_the_loop_asks_redis_nothing(
    servers: Servers, redis: Redis
) -> None:
    node_id = f"idle-{uuid.uuid4().hex[:8]}"
    async with _node(servers, node_id):
        await asyncio.sleep(0.3)  # the check at start is done
        async with _commands_on(redis, _key(node_id)) as seen:
            await asyncio.sleep(1.0)  # ten ticks
    assert seen == []


async def test_what_a_previous_run_left_is_cleared_at_start(servers: Servers, redis: Redis) -> None:
    """Entries for connections the node no longer has (it restarted): the first tick after
    start finds them due and removes them."""
    node_id = f"idle-{uuid.uuid4().hex[:8]}"
    await redis.zadd(_key(node_id), {"gone|room:x|1-0|1": 1})
    async with _node(servers, node_id):
        for _ in range(50):
            if not await redis.zcard(_key(node_id)):
                break
            await asyncio.sleep(0.05)
        assert await redis.zcard(_key(node_id)) == 0


async def test_an_unacknowledged_event_is_still_redelivered_after_an_idle_spell(
    servers: Servers, redis: Redis
) -> None:
    node_id = f"idle-{uuid.uuid4().hex[:8]}"
    async with _node(servers, node_id) as (http, server):
        admin = await new_org_admin(http)
        async with connected(server.ws, admin.access_token) as raw:
            await raw.subscribe("room:idle-ack", ack=True)
            async with _commands_on(redis, _key(node_id)) as seen:
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

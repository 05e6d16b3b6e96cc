"""The registry keeps what it holds in Redis alive: the node's key every beat, and every
connection's key once a minute (in bulk; shortened here), so that a live connection never
drops out of the connection list while a crashed node's keys expire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from apix.realtime import registry
from tests.conftest import LiveServer, Servers, running_node
from tests.identity.factories import new_org_admin
from tests.realtime.raw import connected


@pytest.fixture
async def node(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, LiveServer]]:
    monkeypatch.setattr(registry, "_CONN_REFRESH_S", 0.0)  # every beat refreshes
    monkeypatch.setattr(registry, "_BULK", 3)  # several bulk exchanges per beat
    async with running_node(servers, realtime={"registry_flush_s": 0.1}) as node:
        yield node


async def test_every_live_connection_key_and_the_node_key_are_kept_alive(
    node: tuple[httpx.AsyncClient, LiveServer], redis: Redis
) -> None:
    http, server = node
    admin = await new_org_admin(http)
    gateway: Any = server.app.state.gateway
    async with AsyncExitStack() as stack:
        for _ in range(4):
            await stack.enter_async_context(connected(server.ws, admin.access_token))
        ids = [gateway.connections[k].id for k in gateway.connections]
        assert len(ids) == 4
        keys = [f"apix:conn:{i}" for i in ids] + [f"apix:node:{gateway.node}"]
        for key in keys:
            assert await redis.expire(key, 2)  # as if about to lapse
        await asyncio.sleep(0.5)  # a few beats
        ttls = [await redis.ttl(key) for key in keys]
        assert all(ttl > 20 for ttl in ttls), ttls
        listed = (await http.get("/api/v1/apix/connections", headers=admin.headers)).json()
        assert {row["connection_id"] for row in listed} == set(ids)

"""Two nodes sharing Redis: each answers for the whole cluster."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from apix.app import create_app
from tests.conftest import LiveServer, Servers, make_settings, serve_app
from tests.identity.factories import new_org_admin
from tests.monitoring.conftest import monitoring_settings
from tests.realtime.raw import connected

BASE = "/api/v1/monitoring/latency"


@pytest.fixture
async def nodes(servers: Servers) -> AsyncIterator[list[LiveServer]]:
    async with AsyncExitStack() as stack:
        live = []
        for name in ("node-a", "node-b"):
            settings = make_settings(servers, node_id=name, monitoring=monitoring_settings())
            app = create_app(settings)
            await stack.enter_async_context(app.router.lifespan_context(app))
            live.append(await stack.enter_async_context(serve_app(app, settings)))
        yield live


async def test_every_node_answers_for_the_cluster(nodes: list[LiveServer]) -> None:
    a, b = nodes
    async with (
        httpx.AsyncClient(base_url=a.http) as on_a,
        httpx.AsyncClient(base_url=b.http) as on_b,
    ):
        admin = await new_org_admin(on_a)
        async with (
            connected(a.ws, admin.access_token, client={"type": "WEB_APP"}) as first,
            connected(b.ws, admin.access_token, client={"type": "MOBILE_APP"}) as second,
        ):
            await first.subscribe("room:x")
            await second.subscribe("room:x")
            for n in range(3):
                response = await on_a.post(
                    "/api/v1/apix/channels/room:x/events",
                    headers=admin.headers,
                    json={"type": "t.x", "data": {"n": n}},
                )
                assert response.status_code == 201
            await first.events(3)
            await second.events(3)

            async def stats(http: httpx.AsyncClient) -> dict[str, Any]:
                response = await http.get(f"{BASE}/stats", headers=admin.headers)
                assert response.status_code == 200, response.text
                return response.json()  # type: ignore[no-any-return]

            # Node A pushes when it answers; node B within its push interval.
            for _ in range(50):
                if (await stats(on_a))["delivery"]["count"] >= 6:
                    break
                await asyncio.sleep(0.1)
            for http in (on_a, on_b):
                result = await stats(http)
                by = {(s["namespace"], s["client_type"]): s["count"] for s in result["delivery_by"]}
                assert by == {("room", "WEB_APP"): 3, ("room", "MOBILE_APP"): 3}

            health = (await on_b.get(f"{BASE}/health", headers=admin.headers)).json()
            listed = {n["node"]: n for n in health["nodes"]}
            assert listed.keys() == {"node-a", "node-b"}
            assert all(n["alive"] for n in listed.values())
            assert (listed["node-a"]["connections"], listed["node-b"]["connections"]) == (1, 1)
            assert sum(n["leader"] for n in listed.values()) == 1  # one monitoring lease

            board = (await on_b.get(f"{BASE}/dashboard", headers=admin.headers)).json()
            assert board["connections"]["by_client_type"] == {"MOBILE_APP": 1, "WEB_APP": 1}
            top = {c["channel"]: c for c in board["top_channels"]}
            assert (top["room:x"]["published"], top["room:x"]["delivered"]) == (3, 6)

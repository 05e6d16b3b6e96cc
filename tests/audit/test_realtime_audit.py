"""Connections and subscription changes reach the audit log, batched per registry flush."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from apix.config import Settings
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import new_org_admin
from tests.realtime.raw import raw_socket


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers, realtime={"registry_flush_s": 0.2})


async def connection_events(client: httpx.AsyncClient, headers: dict[str, str]) -> list[Any]:
    page = await client.get(
        "/api/v1/audit/logs", headers=headers, params={"action": "realtime.connections"}
    )
    assert page.status_code == 200, page.text
    return list(reversed(page.json()["items"]))


async def test_connection_lifecycle_is_audited_in_batches(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        connection_id = (await raw.connect(admin.access_token))["connection_id"]
        await raw.subscribe("room:audited")
        await raw.subscribe("org")
        await asyncio.sleep(0.6)  # a flush or two
        await raw.command("unsubscribe", channel="org")
    deadline = time.monotonic() + 10
    while True:
        events = await connection_events(client, admin.headers)
        details = [e["details"] for e in events]
        closed = [c for d in details for c in d.get("closed", [])]
        if closed:
            break
        assert time.monotonic() < deadline, details
        await asyncio.sleep(0.2)
    opened = [c for d in details for c in d.get("opened", [])]
    subscribed = {ch for d in details for s in d.get("subscribed", []) for ch in s["channels"]}
    unsubscribed = {ch for d in details for s in d.get("unsubscribed", []) for ch in s["channels"]}
    assert [o["connection_id"] for o in opened] == [connection_id]
    assert opened[0]["user_id"] == admin.user_id
    assert subscribed == {"room:audited", "org"}
    assert unsubscribed == {"org"}
    assert [c["connection_id"] for c in closed] == [connection_id]
    # Batched: far fewer audit rows than changes, each tagged with the node.
    assert len(events) <= 4
    assert {e["details"]["node"] for e in events} == {"test-node"}
    verify = await client.get("/api/v1/audit/verify", headers=admin.headers)
    assert verify.json()["ok"] is True

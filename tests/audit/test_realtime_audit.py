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


async def audited(
    client: httpx.AsyncClient, headers: dict[str, str], key: str, want: set[str]
) -> list[Any]:
    """Wait until the connection events' ``key`` lists cover ``want``; the events."""
    deadline = time.monotonic() + 10
    while True:
        events = await connection_events(client, headers)
        found = set()
        for event in events:
            for item in event["details"].get(key, []):
                found.update(item.get("channels", [item.get("connection_id")]))
        if want <= found:
            return events
        assert time.monotonic() < deadline, (key, want, events)
        await asyncio.sleep(0.1)


async def test_connection_lifecycle_is_audited_in_batches(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        connection_id = (await raw.connect(admin.access_token))["connection_id"]
        await raw.subscribe("room:audited")
        await raw.subscribe("org")
        await audited(client, admin.headers, "subscribed", {"room:audited", "org"})
        await raw.command("unsubscribe", channel="org")
        await audited(client, admin.headers, "unsubscribed", {"org"})
    events = await audited(client, admin.headers, "closed", {connection_id})
    details = [e["details"] for e in events]
    opened = [c for d in details for c in d.get("opened", [])]
    assert [o["connection_id"] for o in opened] == [connection_id]
    assert opened[0]["user_id"] == admin.user_id
    closed = [c for d in details for c in d.get("closed", [])]
    assert [c["connection_id"] for c in closed] == [connection_id]
    # One audit row per registry flush that had changes (never more rows than changes).
    assert len(events) <= 5
    assert {e["details"]["node"] for e in events} == {"test-node"}
    verify = await client.get("/api/v1/audit/verify", headers=admin.headers)
    assert verify.json()["ok"] is True

"""Usage analytics: events rolled up by the archiver, connections, API calls per key."""

from __future__ import annotations

import asyncio
import csv
import io
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from apix.config import Settings, WorkerSettings
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import bearer, new_api_key, new_member, new_org_admin
from tests.realtime.raw import connected
from tests.realtime.test_protocol_channels import http_publish

ANALYTICS = "/api/v1/analytics"
ENDPOINTS = ["overview", "events", "connections", "usage"]


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(
        servers,
        worker=WorkerSettings(embedded=True, lease_ms=1000),
        realtime={"registry_flush_s": 0.2},
    )


async def until(check: Any, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, "condition never met"
        await asyncio.sleep(0.1)


async def test_every_endpoint_needs_an_org_admin(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    developer = await new_member(client, admin, "DEVELOPER")
    for endpoint in ENDPOINTS:
        url = f"{ANALYTICS}/{endpoint}"
        assert (await client.get(url)).status_code == 401
        assert (await client.get(url, headers=developer.headers)).status_code == 403
        assert (await client.get(url, headers=admin.headers)).status_code == 200


async def test_bad_parameters_are_422(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    now = datetime.now(UTC)
    for endpoint, params in [
        ("events", {"granularity": "week"}),
        ("events", {"from": "yesterday"}),
        ("connections", {"from": now.isoformat(), "to": (now - timedelta(hours=1)).isoformat()}),
        ("usage", {"granularity": "minute", "from": (now - timedelta(days=30)).isoformat()}),
        ("usage", {"api_key_id": "not-a-uuid"}),
        ("events", {"format": "xml"}),
    ]:
        response = await client.get(f"{ANALYTICS}/{endpoint}", headers=admin.headers, params=params)
        assert response.status_code == 422, (endpoint, params, response.text)
        assert set(response.json()["error"]) == {"code", "message", "details"}


async def test_events_are_counted_once_per_minute_namespace_and_type(
    client: httpx.AsyncClient,
) -> None:
    admin, other = await new_org_admin(client), await new_org_admin(client)
    for n in range(5):
        await http_publish(client, admin.headers, "room:a", "chat.message", n)
    for n in range(3):
        await http_publish(client, admin.headers, "agents:x", "tool.called", n)
    await http_publish(client, other.headers, "room:a", "chat.message", "theirs")

    async def counted() -> list[dict[str, Any]] | None:
        rows = (
            await client.get(
                f"{ANALYTICS}/events", headers=admin.headers, params={"granularity": "minute"}
            )
        ).json()["items"]
        return rows if sum(r["count"] for r in rows) >= 8 else None

    rows = await until(counted)
    totals: dict[tuple[str, str], int] = {}
    for row in rows:
        key = (row["namespace"], row["type"])
        totals[key] = totals.get(key, 0) + row["count"]
    assert totals == {("room", "chat.message"): 5, ("agents", "tool.called"): 3}
    only_room = await client.get(
        f"{ANALYTICS}/events", headers=admin.headers, params={"namespace": "room", "format": "csv"}
    )
    assert only_room.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(only_room.text)))
    assert [(r["namespace"], r["type"], r["count"]) for r in table] == [
        ("room", "chat.message", "5")
    ]
    overview = (await client.get(f"{ANALYTICS}/overview", headers=admin.headers)).json()
    assert overview["events"] == 8
    assert overview["events_by_namespace"] == {"room": 5, "agents": 3}
    theirs = (await client.get(f"{ANALYTICS}/overview", headers=other.headers)).json()
    assert theirs["events"] == 1


async def test_connections_are_counted(client: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token), connected(live.ws, admin.access_token):
        pass

    seen: list[Any] = []

    async def both_recorded() -> list[dict[str, Any]] | None:
        rows = (await client.get(f"{ANALYTICS}/connections", headers=admin.headers)).json()["items"]
        seen.append(rows)
        opened, closed = sum(r["opened"] for r in rows), sum(r["closed"] for r in rows)
        return rows if opened >= 2 and closed >= 2 else None

    try:
        rows = await until(both_recorded)
    except AssertionError as exc:
        raise AssertionError(f"connections never counted; answers seen: {seen[-3:]}") from exc
    assert (sum(r["opened"] for r in rows), sum(r["closed"] for r in rows)) == (2, 2)


async def test_api_calls_are_counted_per_key_with_errors(
    client: httpx.AsyncClient, app: Any
) -> None:
    admin = await new_org_admin(client)
    key = await new_api_key(client, admin, role="DEVELOPER")
    headers = bearer(key["key"])
    for _ in range(2):
        assert (await client.get("/api/v1/agents", headers=headers)).status_code == 200
    missing = await client.get(
        "/api/v1/agents/00000000-0000-0000-0000-000000000000", headers=headers
    )
    assert missing.status_code == 404
    # Counts reach PostgreSQL every few seconds; stopping a node flushes them too.
    await app.state.api_usage.flush(app.state.database)
    rows = (await client.get(f"{ANALYTICS}/usage", headers=admin.headers)).json()["items"]
    assert [(r["api_key_id"], r["requests"], r["errors"]) for r in rows] == [(key["id"], 3, 1)]
    filtered = (
        await client.get(
            f"{ANALYTICS}/usage",
            headers=admin.headers,
            params={"api_key_id": "00000000-0000-0000-0000-000000000000"},
        )
    ).json()["items"]
    assert filtered == []

"""The monitoring API: who may read what, and figures measured on real sockets."""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.identity.factories import Account, new_api_key, new_member, new_org_admin
from tests.realtime.raw import Raw, connected

BASE = "/api/v1/monitoring/latency"
ENDPOINTS = ["stats", "alerts", "dashboard", "health", "thresholds"]


async def _publish(client: httpx.AsyncClient, account: Account, channel: str, n: int) -> None:
    response = await client.post(
        f"/api/v1/apix/channels/{channel}/events",
        headers=account.headers,
        json={"type": "test.event", "data": {"n": n}},
    )
    assert response.status_code == 201, response.text


async def _answer_pings(raw: Raw, delay_s: float, until: float) -> int:
    """Answer the server's pings after ``delay_s``; return how many were answered."""
    answered = 0
    while time.monotonic() < until:
        try:
            frame = json.loads(await asyncio.wait_for(raw.ws.recv(), until - time.monotonic()))
        except TimeoutError:
            break
        if frame.get("op") == "ping":
            await asyncio.sleep(delay_s)
            await raw.send({"op": "pong", "ts": frame["ts"]})
            answered += 1
    return answered


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_anonymous_is_401_and_members_below_org_admin_are_403(
    client: httpx.AsyncClient, endpoint: str
) -> None:
    admin = await new_org_admin(client)
    assert (await client.get(f"{BASE}/{endpoint}")).status_code == 401
    for role in ("VIEWER", "DEVELOPER"):
        member = await new_member(client, admin, role)
        response = await client.get(f"{BASE}/{endpoint}", headers=member.headers)
        assert response.status_code == 403, response.text
        assert response.json()["error"]["code"] == "forbidden"
    assert (await client.get(f"{BASE}/{endpoint}", headers=admin.headers)).status_code == 200


@pytest.mark.parametrize("endpoint", ENDPOINTS)
async def test_another_organisation_is_404(client: httpx.AsyncClient, endpoint: str) -> None:
    admin = await new_org_admin(client)
    other = await new_org_admin(client)
    response = await client.get(
        f"{BASE}/{endpoint}", headers=admin.headers, params={"org_id": other.org_id}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "not_found"
    own = await client.get(
        f"{BASE}/{endpoint}", headers=admin.headers, params={"org_id": admin.org_id}
    )
    assert own.status_code == 200


async def test_an_org_admin_api_key_may_read(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    key = await new_api_key(client, admin, role="ORG_ADMIN")
    response = await client.get(f"{BASE}/stats", headers={"X-API-Key": key["key"]})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "params",
    [
        {"window": "2m"},
        {"namespace": "nope"},
        {"client_type": "FRIDGE"},
        {"org_id": "not-a-uuid"},
    ],
)
async def test_bad_parameters_are_422(client: httpx.AsyncClient, params: dict[str, str]) -> None:
    admin = await new_org_admin(client)
    response = await client.get(f"{BASE}/stats", headers=admin.headers, params=params)
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "validation_error"


async def test_delivery_latency_and_rtt_are_measured_per_namespace_and_client_type(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    other = await new_org_admin(client)
    async with (
        connected(live.ws, admin.access_token, client={"type": "WEB_APP"}) as web,
        connected(live.ws, admin.access_token, client={"type": "INTERNAL_SERVICE"}) as service,
    ):
        await web.subscribe("room:lobby")
        await service.subscribe("room:lobby")
        await service.subscribe("org")
        for n in range(5):
            await _publish(client, admin, "room:lobby", n)
            await _publish(client, admin, "org", n)
        await web.events(5)
        await service.events(10)
        # A client that answers pings 200 ms late shows a round trip of about 200 ms.
        answered = await _answer_pings(web, 0.2, time.monotonic() + 2.0)
        assert answered >= 2

    response = await client.get(f"{BASE}/stats", headers=admin.headers, params={"window": "5m"})
    assert response.status_code == 200, response.text
    stats = response.json()
    assert stats["org_id"] == admin.org_id
    series = {(s["namespace"], s["client_type"]): s for s in stats["delivery_by"]}
    assert series.keys() == {
        ("room", "WEB_APP"),
        ("room", "INTERNAL_SERVICE"),
        ("org", "INTERNAL_SERVICE"),
    }
    assert series[("room", "WEB_APP")]["count"] == 5
    assert series[("org", "INTERNAL_SERVICE")]["count"] == 5
    assert stats["delivery"]["count"] == 15
    assert 0 <= stats["delivery"]["p50"] < 1000
    assert stats["http"] is None  # platform figures are for operators

    rtt = {s["client_type"]: s for s in stats["rtt_by"]}
    assert rtt["WEB_APP"]["count"] >= answered
    assert 190 <= rtt["WEB_APP"]["p50"] <= 450, rtt

    filtered = (
        await client.get(
            f"{BASE}/stats",
            headers=admin.headers,
            params={"window": "5m", "namespace": "room", "client_type": "WEB_APP"},
        )
    ).json()
    assert [(s["namespace"], s["client_type"]) for s in filtered["delivery_by"]] == [
        ("room", "WEB_APP")
    ]
    assert filtered["delivery"]["count"] == 5

    # Another organisation sees none of it.
    theirs = (await client.get(f"{BASE}/stats", headers=other.headers)).json()
    assert theirs["delivery"]["count"] == 0
    assert theirs["delivery_by"] == []


async def test_dashboard_shows_connections_events_and_top_channels(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token, client={"type": "MOBILE_APP"}) as raw:
        await raw.subscribe("room:busy")
        await raw.subscribe("room:quiet")
        for n in range(6):
            await _publish(client, admin, "room:busy", n)
        await _publish(client, admin, "room:quiet", 0)
        await raw.events(7)
        board = await _eventually(
            client,
            admin,
            "dashboard",
            lambda b: _rooms(b)[:2] == [("room:busy", 6, 6), ("room:quiet", 1, 1)],
        )
    assert board["connections"]["by_client_type"] == {"MOBILE_APP": 1}
    assert board["connections"]["series"][-1]["value"] == 1
    assert board["events"]["delivered_per_s"] == pytest.approx(7 / 60, abs=0.01)
    # Published: the 7 events, and what the gateway announced on `monitor` meanwhile.
    assert board["events"]["published_per_s"] >= round(7 / 60, 3)
    assert board["delivery_latency"]["last_minute"]["count"] == 7
    assert board["delivery_latency"]["series"][-1]["count"] == 7
    assert _rooms(board) == [("room:busy", 6, 6), ("room:quiet", 1, 1)]
    assert "monitor" in {c["channel"] for c in board["top_channels"]}  # the gateway's own
    assert board["dead_letters"] == {
        "last_minute": 0,
        "last_hour": 0,
        "pending": 0,
        "series": board["dead_letters"]["series"],
    }
    assert len(board["dead_letters"]["series"]) == 60


async def test_health_lists_components_and_this_node(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    health = await _eventually(client, admin, "health", lambda h: h["nodes"])
    assert health["status"] == "ok", health
    assert health["postgres"]["ok"]
    assert health["redis"]["ok"]
    (node,) = health["nodes"]
    assert node["node"] == "test-node"
    assert node["process"] == f"test-node:{os.getpid()}"  # each process reports apart
    assert node["alive"] is True
    assert node["connections"] == 0
    assert node["subscriptions"] is None  # platform detail, not an organisation's
    assert health["archive"]["events_behind"] == 0


def _rooms(board: dict[str, Any]) -> list[tuple[str, int, int]]:
    return [
        (c["channel"], c["published"], c["delivered"])
        for c in board["top_channels"]
        if c["channel"].startswith("room:")
    ]


async def _eventually(
    client: httpx.AsyncClient, admin: Account, endpoint: str, ready: Any, timeout_s: float = 5.0
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.get(f"{BASE}/{endpoint}", headers=admin.headers)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        if ready(body) or time.monotonic() > deadline:
            return body
        await asyncio.sleep(0.1)

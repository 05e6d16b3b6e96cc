"""The gateway's HTTP API (PROTOCOL.md section 8): publish, history and presence."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer
from tests.identity.factories import bearer, new_api_key, new_member, new_org_admin, new_super_admin
from tests.realtime.raw import connected, raw_socket

CHANNELS = "/api/v1/apix/channels"


def events_url(channel: str) -> str:
    return f"{CHANNELS}/{channel}/events"


def presence_url(channel: str) -> str:
    return f"{CHANNELS}/{channel}/presence"


def assert_error(response: httpx.Response, status: int, codes: set[str]) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] in codes, error
    assert isinstance(error["message"], str)


async def test_anonymous_callers_are_refused(client: httpx.AsyncClient) -> None:
    for method, url, body in (
        ("POST", events_url("room:x"), {"type": "a.b", "data": 1}),
        ("GET", events_url("room:x"), None),
        ("GET", presence_url("room:x"), None),
    ):
        response = await client.request(method, url, json=body)
        assert_error(response, 401, {"unauthorized"})
        response = await client.request(
            method, url, json=body, headers={"Authorization": "Bearer nonsense"}
        )
        assert response.status_code == 401, response.text


async def test_publish_needs_apix_publish(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    developer = await new_member(client, admin, "DEVELOPER")
    body = {"type": "chat.message", "data": {"n": 1}}

    assert_error(
        await client.post(events_url("room:x"), headers=viewer.headers, json=body),
        403,
        {"forbidden"},
    )
    # VIEWER may still read what it may subscribe to.
    response = await client.get(events_url("room:x"), headers=viewer.headers)
    assert response.status_code == 200, response.text
    assert response.json()["events"] == []

    published = []
    for channel in (
        "room:x",
        "agents:agt_1",
        "sessions:s1",
        "org",
        "hitl",
        f"user:{viewer.user_id}",
    ):
        response = await client.post(events_url(channel), headers=developer.headers, json=body)
        assert response.status_code == 201, (channel, response.text)
        result = response.json()
        assert set(result) == {"offset", "epoch", "id", "duplicate"}
        assert result["duplicate"] is False
        published.append(result)
    assert len({p["id"] for p in published}) == len(published)

    # API keys: with apix:publish (a DEVELOPER key), yes; without it, no.
    with_publish = await new_api_key(client, admin, role="DEVELOPER")
    response = await client.post(
        events_url("room:x"), headers={"X-API-Key": with_publish["key"]}, json=body
    )
    assert response.status_code == 201, response.text
    read_only = await new_api_key(client, admin, role="VIEWER")
    assert_error(
        await client.post(events_url("room:x"), headers={"X-API-Key": read_only["key"]}, json=body),
        403,
        {"forbidden"},
    )
    scoped = await new_api_key(client, admin, permissions=["apix:subscribe"])
    assert_error(
        await client.post(events_url("room:x"), headers={"X-API-Key": scoped["key"]}, json=body),
        403,
        {"forbidden"},
    )
    history = (await client.get(events_url("room:x"), headers=admin.headers)).json()
    assert [e["data"] for e in history["events"]] == [{"n": 1}, {"n": 1}]

    # Nobody publishes on `monitor` (the gateway does), and only SUPER_ADMIN on `system`.
    for who in (developer, admin):
        for channel in ("monitor", "system"):
            assert_error(
                await client.post(events_url(channel), headers=who.headers, json=body),
                403,
                {"forbidden"},
            )


@pytest.mark.parametrize(
    "channel",
    ["Room:x", "room:a%20b", "org:x", "room", "room:" + "k" * 129, "r" * 72 + ":" + "k" * 128],
)
async def test_bad_channel_names_are_400(client: httpx.AsyncClient, channel: str) -> None:
    admin = await new_org_admin(client)
    body = {"type": "a.b", "data": 1}
    assert_error(
        await client.post(events_url(channel), headers=admin.headers, json=body),
        400,
        {"bad_request"},
    )
    assert_error(await client.get(events_url(channel), headers=admin.headers), 400, {"bad_request"})
    assert_error(
        await client.get(presence_url(channel), headers=admin.headers), 400, {"bad_request"}
    )


async def test_unknown_namespace_is_404_and_bad_event_type_is_422(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    for channel in ("nope:x", "nope"):
        body = {"type": "a.b", "data": 1}
        assert_error(
            await client.post(events_url(channel), headers=admin.headers, json=body),
            404,
            {"not_found"},
        )
        assert_error(
            await client.get(events_url(channel), headers=admin.headers), 404, {"not_found"}
        )
        assert_error(
            await client.get(presence_url(channel), headers=admin.headers), 404, {"not_found"}
        )
    for body in (
        {"type": "Not A Type", "data": 1},
        {"type": "", "data": 1},
        {"type": "UPPER", "data": 1},
        {"type": ".leading", "data": 1},
        {"data": 1},
        {"type": 5},
    ):
        response = await client.post(events_url("room:x"), headers=admin.headers, json=body)
        assert response.status_code == 422, (body, response.text)
        assert "error" in response.json()
    history = (await client.get(events_url("room:x"), headers=admin.headers)).json()
    assert history["events"] == []


async def test_history_is_per_tenant_and_honours_since_limit_reverse(
    client: httpx.AsyncClient,
) -> None:
    alpha = await new_org_admin(client)
    beta = await new_org_admin(client)
    channel = "room:shared"
    offsets = []
    for n in range(5):
        response = await client.post(
            events_url(channel), headers=alpha.headers, json={"type": "e.v", "data": n}
        )
        offsets.append(response.json()["offset"])
    mine = (await client.get(events_url(channel), headers=alpha.headers)).json()
    assert [e["data"] for e in mine["events"]] == [0, 1, 2, 3, 4]
    assert mine["position"]["offset"] == offsets[-1]
    for event in mine["events"]:
        assert event["channel"] == channel
        assert event["op"] == "event"
        assert set(event) >= {"offset", "epoch", "id", "type", "ts", "data", "meta", "attempt"}

    theirs = (await client.get(events_url(channel), headers=beta.headers)).json()
    assert theirs["events"] == []
    assert theirs["position"]["offset"] != offsets[-1]
    assert theirs["position"]["epoch"] != mine["position"]["epoch"]
    response = await client.get(
        events_url(channel), headers=beta.headers, params={"since": "0-0", "limit": 1000}
    )
    assert response.json()["events"] == []

    async def read(**params: Any) -> list[int]:
        response = await client.get(events_url(channel), headers=alpha.headers, params=params)
        assert response.status_code == 200, response.text
        return [e["data"] for e in response.json()["events"]]

    assert await read(limit=2) == [3, 4]
    assert await read(limit=2, reverse="true") == [4, 3]
    assert await read(since=offsets[1]) == [2, 3, 4]
    assert await read(since=offsets[1], limit=1) == [2]
    assert await read(since=offsets[4]) == []
    for bad in ({"limit": 0}, {"limit": 1001}, {"since": "yesterday"}):
        response = await client.get(events_url(channel), headers=alpha.headers, params=bad)
        assert response.status_code in (400, 422), (bad, response.text)


async def test_private_channels_stay_private_over_http(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    body = {"type": "inbox.note", "data": "secret"}
    response = await client.post(
        events_url(f"user:{viewer.user_id}"), headers=admin.headers, json=body
    )
    assert response.status_code == 201, response.text
    # Only that user reads the inbox, not even an ORG_ADMIN.
    assert_error(
        await client.get(events_url(f"user:{viewer.user_id}"), headers=admin.headers),
        403,
        {"forbidden"},
    )
    own = await client.get(events_url("user:me"), headers=viewer.headers)
    assert own.status_code == 200, own.text
    assert [(e["channel"], e["data"]) for e in own.json()["events"]] == [
        (f"user:{viewer.user_id}", "secret")
    ]
    for channel in ("hitl", "monitor", f"user:{admin.user_id}"):
        for url in (events_url(channel), presence_url(channel)):
            assert_error(await client.get(url, headers=viewer.headers), 403, {"forbidden"})


async def test_presence_over_http_lists_the_channels_presence_members(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    alpha = await new_org_admin(client)
    beta = await new_org_admin(client)
    channel = "room:here"
    empty = await client.get(presence_url(channel), headers=alpha.headers)
    assert empty.status_code == 200, empty.text
    assert empty.json() == {"clients": []}
    async with raw_socket(live.ws) as raw:
        hello = await raw.connect(alpha.access_token, client={"type": "WEB_APP", "name": "console"})
        await raw.subscribe(channel, presence=True)
        listed = (await client.get(presence_url(channel), headers=alpha.headers)).json()
        (member,) = listed["clients"]
        assert member["user_id"] == alpha.user_id
        assert member["client_type"] == "WEB_APP"
        assert member["info"] == {"name": "console"}
        assert member["connection_id"] == hello["connection_id"]
        # Another tenant's same-named channel has nobody.
        other = (await client.get(presence_url(channel), headers=beta.headers)).json()
        assert other == {"clients": []}
    # The server notices the close asynchronously: give it a moment.
    for _ in range(40):
        after = (await client.get(presence_url(channel), headers=alpha.headers)).json()
        if after == {"clients": []}:
            break
        await asyncio.sleep(0.05)
    assert after == {"clients": []}


async def test_system_notices_come_from_super_admin_only_and_reach_every_tenant(
    client: httpx.AsyncClient, live: LiveServer, runtime: Any
) -> None:
    alpha = await new_org_admin(client)
    beta = await new_org_admin(client)
    root = await new_super_admin(client, runtime)
    body = {"type": "system.notice", "data": {"text": "maintenance at noon"}}
    assert_error(
        await client.post(events_url("system"), headers=alpha.headers, json=body),
        403,
        {"forbidden"},
    )
    async with (
        connected(live.ws, alpha.access_token) as a,
        connected(live.ws, beta.access_token) as b,
    ):
        await a.subscribe("system")
        await b.subscribe("system")
        response = await client.post(
            events_url("system"), headers=bearer(root["access_token"]), json=body
        )
        assert response.status_code == 201, response.text
        result = response.json()
        assert result["duplicate"] is False
        for raw in (a, b):
            (event,) = await raw.events(1)
            assert event["channel"] == "system"
            assert event["offset"] == result["offset"]
            assert event["id"] == result["id"]
            assert event["type"] == "system.notice"
            assert event["data"] == {"text": "maintenance at noon"}
        # Nothing from the refused attempt reached anyone.
        assert not [f for raw in (a, b) for f in raw.frames if f.get("op") == "event"]
    for who in (alpha, beta):
        history = (await client.get(events_url("system"), headers=who.headers)).json()
        assert [e["id"] for e in history["events"]] == [result["id"]]


async def test_data_that_cannot_be_stored_as_json_is_400_and_nothing_is_published(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    # Valid JSON text, but a lone surrogate is no Unicode character: it cannot be stored.
    body = b'{"type": "a.b", "data": {"text": "\\ud800"}}'
    headers = {**admin.headers, "Content-Type": "application/json"}
    response = await client.post(events_url("room:x"), headers=headers, content=body)
    assert_error(response, 400, {"bad_request"})
    history = await client.get(events_url("room:x"), headers=admin.headers)
    assert history.status_code == 200, history.text
    assert history.json()["events"] == []

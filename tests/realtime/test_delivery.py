"""Delivery guarantees through the protocol: idempotent publish, session resume, offline
inbox, acknowledged delivery with redelivery, dead letters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.conftest import LiveServer, Servers, running_node
from tests.identity.factories import Account, new_member, new_org_admin
from tests.realtime.raw import connected, raw_socket


async def _publish(
    client: httpx.AsyncClient, account: Account, channel: str, n: int, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        f"/api/v1/apix/channels/{channel}/events",
        headers=account.headers,
        json={"type": "test.event", "data": {"n": n}, **extra},
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def _until_gone(client: httpx.AsyncClient, admin: Account, connection_id: str) -> None:
    """Wait until the server has seen a connection close (its close is asynchronous to the
    client's): events published after that are what the connection missed."""
    for _ in range(100):
        listed = (await client.get("/api/v1/apix/connections", headers=admin.headers)).json()
        if connection_id not in {c["connection_id"] for c in listed}:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{connection_id} still connected")


async def test_http_publish_is_idempotent_per_channel(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    first = await _publish(client, admin, "room:idem", 1, idempotency_key="order-42")
    again = await _publish(client, admin, "room:idem", 2, idempotency_key="order-42")
    assert first["duplicate"] is False
    assert again == {**first, "duplicate": True}
    other = await _publish(client, admin, "room:other", 3, idempotency_key="order-42")
    assert other["duplicate"] is False
    history = (
        await client.get("/api/v1/apix/channels/room:idem/events", headers=admin.headers)
    ).json()
    assert [e["data"] for e in history["events"]] == [{"n": 1}]


async def test_concurrent_retries_store_one_event(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    results = await asyncio.gather(
        *(_publish(client, admin, "room:race", n, idempotency_key="same") for n in range(20))
    )
    assert len({r["offset"] for r in results}) == 1
    assert sum(not r["duplicate"] for r in results) == 1
    history = (
        await client.get("/api/v1/apix/channels/room:race/events", headers=admin.headers)
    ).json()
    assert len(history["events"]) == 1


async def test_ws_publish_is_idempotent(client: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        body = {"channel": "room:w", "type": "x.y", "data": 1, "idempotency_key": "k1"}
        first = await raw.command("publish", **body)
        second = await raw.command("publish", **body)
    assert first["result"]["duplicate"] is False
    assert second["result"] == {**first["result"], "duplicate": True}


async def test_resume_restores_subscriptions_and_replays_what_was_missed(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        first = await raw.connect(admin.access_token)
        await raw.subscribe("room:r2")
        await _publish(client, admin, "room:r2", 1)
        await raw.events(1)
    await _until_gone(client, admin, first["connection_id"])
    missed = [await _publish(client, admin, "room:r2", n) for n in (2, 3)]
    async with raw_socket(live.ws) as raw:
        result = await raw.connect(admin.access_token, resume=first["session"])
        assert result["resumed"] is True
        assert result["session"] == first["session"]
        assert result["subscriptions"] == [{"channel": "room:r2", "recovered": True, "replayed": 2}]
        replayed = await raw.events(2)
        assert [e["offset"] for e in replayed] == [m["offset"] for m in missed]
        live_one = await _publish(client, admin, "room:r2", 4)
        (after,) = await raw.events(1)
        assert after["offset"] == live_one["offset"]


async def test_a_session_cannot_be_resumed_by_another_principal(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    colleague = await new_member(client, admin, "ORG_ADMIN")
    stranger = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        first = await raw.connect(admin.access_token)
        await raw.subscribe("org")
    for other in (colleague, stranger):
        async with raw_socket(live.ws) as raw:
            result = await raw.connect(other.access_token, resume=first["session"])
            assert result["resumed"] is False
            assert result["subscriptions"] == []
            assert result["session"] != first["session"]


async def test_offline_inbox_is_delivered_in_order_on_the_next_connect(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    user = await new_member(client, admin, "VIEWER")
    async with raw_socket(live.ws) as raw:
        first = await raw.connect(user.access_token)
        added = await raw.subscribe("user:me")
    position = added["position"]
    inbox = f"user:{user.user_id}"
    await _until_gone(client, admin, first["connection_id"])
    sent = [await _publish(client, admin, inbox, n) for n in range(5)]
    async with raw_socket(live.ws) as raw:
        await raw.connect(user.access_token)
        result = await raw.subscribe("user:me", since=position)
        assert result["recovered"] is True
        assert result["replayed"] == 5
        events = await raw.events(5)
    assert [e["offset"] for e in events] == [s["offset"] for s in sent]
    assert all(e["channel"] == inbox for e in events)
    # And through resume, without the client remembering anything.
    await _publish(client, admin, inbox, 99)
    async with raw_socket(live.ws) as raw:
        result = await raw.connect(user.access_token, resume=first["session"])
        assert result["subscriptions"][0]["replayed"] == 6


@pytest.fixture
async def fast_ack(servers: Servers) -> AsyncIterator[tuple[httpx.AsyncClient, LiveServer]]:
    realtime = {"ack_timeout_ms": 300, "redelivery_backoff_ms": [100, 200], "max_attempts": 3}
    async with running_node(servers, realtime=realtime) as node:
        yield node


async def test_unacknowledged_events_are_redelivered_then_dead_lettered(
    fast_ack: tuple[httpx.AsyncClient, LiveServer],
) -> None:
    http, server = fast_ack
    admin = await new_org_admin(http)
    async with (
        connected(server.ws, admin.access_token) as watcher,
        connected(server.ws, admin.access_token) as raw,
    ):
        await watcher.subscribe("monitor", filter={"types": ["message.failed"]})
        await raw.subscribe("room:acks", ack=True)
        sent = await _publish(http, admin, "room:acks", 1)
        attempts = [e["attempt"] for e in await raw.events(3, timeout=10)]
        assert attempts == [1, 2, 3]
        (failed,) = await watcher.events(1, timeout=10)
    assert failed["type"] == "message.failed"
    assert failed["data"]["offset"] == sent["offset"]
    assert failed["data"]["attempts"] == 3
    page = (await http.get("/api/v1/apix/dead-letters", headers=admin.headers)).json()
    assert [d["offset"] for d in page["items"]] == [sent["offset"]]
    letter = page["items"][0]
    assert letter["status"] == "pending"
    assert letter["event"]["data"] == {"n": 1}
    redelivered = await http.post(
        f"/api/v1/apix/dead-letters/{letter['id']}/redeliver", headers=admin.headers
    )
    assert redelivered.status_code == 200
    assert redelivered.json()["status"] == "redelivered"
    history = (
        await http.get("/api/v1/apix/channels/room:acks/events", headers=admin.headers)
    ).json()["events"]
    assert history[-1]["meta"]["redelivery_of"] == sent["id"]
    again = await http.delete(f"/api/v1/apix/dead-letters/{letter['id']}", headers=admin.headers)
    assert again.status_code == 409


async def test_acknowledged_events_are_not_redelivered(
    fast_ack: tuple[httpx.AsyncClient, LiveServer],
) -> None:
    http, server = fast_ack
    admin = await new_org_admin(http)
    async with connected(server.ws, admin.access_token) as raw:
        await raw.subscribe("room:ok", ack=True)
        sent = [await _publish(http, admin, "room:ok", n) for n in range(3)]
        events = await raw.events(3)
        reply = await raw.command("ack", channel="room:ok", offset=events[-1]["offset"])
        assert reply["result"] == {"channel": "room:ok", "offset": sent[-1]["offset"]}
        await asyncio.sleep(1.0)  # several ack timeouts
        redelivered = [f for f in raw.frames if f.get("op") == "event"]
        with pytest.raises(TimeoutError):
            redelivered.append(await raw.recv(timeout=0.3))
    assert redelivered == []
    page = (await http.get("/api/v1/apix/dead-letters", headers=admin.headers)).json()
    assert page["items"] == []


async def test_resumed_ack_subscription_restarts_from_the_last_acknowledged_event(
    fast_ack: tuple[httpx.AsyncClient, LiveServer],
) -> None:
    http, server = fast_ack
    admin = await new_org_admin(http)
    async with raw_socket(server.ws) as raw:
        first = await raw.connect(admin.access_token)
        await raw.subscribe("room:resume-ack", ack=True)
        sent = [await _publish(http, admin, "room:resume-ack", n) for n in range(4)]
        await raw.events(4)
        await raw.command("ack", channel="room:resume-ack", offset=sent[1]["offset"])
    await _until_gone(http, admin, first["connection_id"])
    async with raw_socket(server.ws) as raw:
        result = await raw.connect(admin.access_token, resume=first["session"])
        assert result["subscriptions"] == [
            {"channel": "room:resume-ack", "recovered": True, "replayed": 2}
        ]
        again = await raw.events(2)
    assert [e["offset"] for e in again] == [s["offset"] for s in sent[2:]]


async def test_dead_letters_are_admin_only_and_tenant_scoped(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    assert (
        await client.get("/api/v1/apix/dead-letters", headers=viewer.headers)
    ).status_code == 403
    assert (await client.get("/api/v1/apix/dead-letters")).status_code == 401
    missing = await client.post(
        "/api/v1/apix/dead-letters/00000000-0000-0000-0000-000000000000/redeliver",
        headers=admin.headers,
    )
    assert missing.status_code == 404
    bad_cursor = await client.get(
        "/api/v1/apix/dead-letters", params={"cursor": "!!!"}, headers=admin.headers
    )
    assert bad_cursor.status_code == 400

"""The gateway's main path end to end: connect, subscribe, publish (WS and HTTP), history."""

from __future__ import annotations

import httpx

from tests.conftest import LiveServer
from tests.identity.factories import new_org_admin
from tests.realtime.raw import connected


async def test_connect_subscribe_publish_and_receive(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe("room:lobby")
        assert added["type"] == "subscription.added"
        assert added["recovered"] is True
        published = await raw.command(
            "publish", channel="room:lobby", type="chat.message", data={"text": "hi"}
        )
        assert published["ok"] is True
        http = await client.post(
            "/api/v1/apix/channels/room:lobby/events",
            headers=admin.headers,
            json={"type": "chat.message", "data": {"text": "from http"}},
        )
        assert http.status_code == 201
        first, second = await raw.events(2)
        assert first["offset"] == published["result"]["offset"]
        assert first["data"] == {"text": "hi"}
        assert second["offset"] == http.json()["offset"]
        assert second["channel"] == "room:lobby"
        assert second["attempt"] == 1
        history = await raw.command("history", channel="room:lobby", limit=10)
        assert [e["offset"] for e in history["result"]["events"]] == [
            first["offset"],
            second["offset"],
        ]
        gateway = (await client.get("/api/v1/status")).json()["gateway"]
        assert gateway["connections"] == 1
        assert gateway["subscriptions"] == 1
        assert gateway["events_in"] >= 2
        assert gateway["frames_out"] >= 2

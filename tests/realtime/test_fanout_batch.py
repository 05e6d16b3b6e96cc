"""Events that reach a node together are fanned out together: each subscriber's socket gets
their frames in one write, in order, and nothing is lost or sent twice."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.conftest import LiveServer
from tests.identity.factories import new_org_admin
from tests.realtime.raw import Raw, connected

BURST = 30


async def _burst(live: LiveServer, headers: dict[str, str], channel: str, first: int) -> None:
    """``BURST`` HTTP publishes at once: the node sends their scripts to Redis together, and
    Redis announces the events back to back."""
    async with httpx.AsyncClient(base_url=live.http, headers=headers, timeout=10) as http:
        answers = await asyncio.gather(
            *(
                http.post(
                    f"/api/v1/apix/channels/{channel}/events",
                    json={"type": "burst.tick", "data": {"n": first + n}},
                )
                for n in range(BURST)
            )
        )
    assert [a.status_code for a in answers] == [201] * BURST


async def _status(live: LiveServer) -> dict[str, Any]:
    async with httpx.AsyncClient(base_url=live.http, timeout=10) as http:
        gateway: dict[str, Any] = (await http.get("/api/v1/status")).json()["gateway"]
    return gateway


async def test_a_burst_reaches_every_subscriber_in_order_in_fewer_writes(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    channel = "room:burst"
    async with (
        connected(live.ws, admin.access_token) as a,
        connected(live.ws, admin.access_token) as b,
        connected(live.ws, admin.access_token) as c,
    ):
        subscribers: list[Raw] = [a, b, c]
        for raw in subscribers:
            await raw.subscribe(channel)
        before = await _status(live)
        bursts = 0
        # Redis announces a burst's events together, so the first burst is all it takes;
        # a few more only in case the machine split one.
        while bursts < 3:
            await _burst(live, admin.headers, channel, bursts * BURST)
            bursts += 1
            received = [await raw.events(BURST) for raw in subscribers]
            if (await _status(live))["writes_saved"] > before["writes_saved"]:
                break
        after = await _status(live)
        assert after["fanout_batches"] > before["fanout_batches"]
        assert after["writes_saved"] > before["writes_saved"]

        history = await a.command("history", channel=channel, limit=1000)
        stored = [e["offset"] for e in history["result"]["events"]][-BURST:]
        for events in received:  # the last burst: every event once, in the stored order
            assert [e["offset"] for e in events] == stored
            assert sorted(e["data"]["n"] for e in events) == list(
                range((bursts - 1) * BURST, bursts * BURST)
            )
        for raw in subscribers:  # nothing after them, nothing twice
            reply = await raw.command("ping")  # what came before the reply is collected
            assert reply["ok"] is True
            assert [f for f in raw.frames if f.get("op") == "event"] == []


async def test_one_subscriber_of_two_channels_gets_each_channel_in_order(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe("room:left")
        await raw.subscribe("room:right")
        await asyncio.gather(
            _burst(live, admin.headers, "room:left", 0),
            _burst(live, admin.headers, "room:right", 0),
        )
        events = await raw.events(2 * BURST)
        for channel in ("room:left", "room:right"):
            offsets = [e["offset"] for e in events if e["channel"] == channel]
            history = await raw.command("history", channel=channel, limit=100)
            assert offsets == [e["offset"] for e in history["result"]["events"]]

"""Fault scenario 6: a client's network stalls (it neither receives nor acknowledges) for
longer than the ack timeout.

A TCP proxy between the client and an `apix serve` node stops forwarding in both directions
while it keeps reading what the node sends, so each (re)delivery is timestamped when it left
the node. Expected, per docs/protocol.md ("Acknowledged delivery"): attempt k+1 follows
attempt k after ``ack_timeout_ms`` + ``redelivery_backoff_ms[k-1]`` (±20% jitter); one ack
timeout after attempt ``max_attempts`` the event is dead-lettered, listed by
``GET /api/v1/apix/dead-letters`` and announced as ``message.failed`` on ``monitor``. A
shorter stall ends with the client acknowledging the redelivery: no dead letter.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import httpx
import pytest

from apix.client import Event
from tests.conftest import Servers
from tests.faults.conftest import StartNodes, admin_on
from tests.faults.processes import Node, StallProxy
from tests.faults.traffic import EVENT_TYPE, AppStream, report
from tests.realtime.raw import connected, raw_socket

pytestmark = pytest.mark.e2e

ACK_TIMEOUT_S = 0.5
BACKOFF_S = [0.5, 1.0, 2.0]
MAX_ATTEMPTS = 4
JITTER = 0.2
# The node checks for due redeliveries every 0.1 s; the rest is scheduling on a busy machine.
LATE_S = 0.4
EARLY_S = 0.05  # the first send and its redelivery leave through different write paths
CHANNEL = "room:stall"


@pytest.fixture
def node(servers: Servers, start_nodes: StartNodes) -> Node:
    (node,) = start_nodes(
        1,
        database_url=servers.database_url,
        redis_url=servers.redis_url,
        env={
            "APIX_REALTIME__ACK_TIMEOUT_MS": str(int(ACK_TIMEOUT_S * 1000)),
            "APIX_REALTIME__REDELIVERY_BACKOFF_MS": str([int(b * 1000) for b in BACKOFF_S]),
            "APIX_REALTIME__MAX_ATTEMPTS": str(MAX_ATTEMPTS),
        },
    )
    return node


async def _publish(http: httpx.AsyncClient, n: int) -> dict[str, Any]:
    response = await http.post(
        f"/api/v1/apix/channels/{CHANNEL}/events", json={"type": EVENT_TYPE, "data": {"n": n}}
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def _sends(proxy: StallProxy, offset: str) -> list[tuple[float, int]]:
    """(time it left the node, attempt) of each frame of the event at ``offset``."""
    return [
        (s.at, s.frame["attempt"])
        for s in proxy.sent
        if s.frame.get("op") == "event" and s.frame.get("offset") == offset
    ]


async def _until(predicate: Any, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.mark.timeout(90)
async def test_a_stalled_client_gets_redeliveries_on_the_backoff_then_a_dead_letter(
    node: Node, record_summary: Any
) -> None:
    started = time.monotonic()
    admin = await admin_on(node)
    proxy = StallProxy(node.port)
    await proxy.start()
    app = AppStream()
    try:
        async with (
            httpx.AsyncClient(base_url=node.http, headers=admin.headers, timeout=10) as http,
            connected(node.ws, admin.access_token) as monitor,
            raw_socket(proxy.ws, compression=None) as client,
        ):
            await monitor.subscribe("monitor", filter={"types": ["message.failed"]})
            info = await client.connect(admin.access_token)
            await client.subscribe(CHANNEL, ack=True)

            # Acknowledged in time: delivered once, never again.
            first = await _publish(http, 1)
            (event,) = await client.events(1)
            assert (event["offset"], event["attempt"]) == (first["offset"], 1)
            app.feed(Event.from_wire(event))
            assert (await client.command("ack", channel=CHANNEL, offset=first["offset"]))["ok"]

            # A stall longer than the whole schedule: every attempt, then the dead letter.
            proxy.stall()
            stalled_at = time.monotonic()
            second = await _publish(http, 2)
            (failed,) = await monitor.events(1, timeout=20)
            failed_seen_at = time.monotonic()
            await asyncio.sleep(ACK_TIMEOUT_S)  # nothing more may come: checked below
            proxy.release()
            long_stall_s = time.monotonic() - stalled_at
            frames = await client.events(MAX_ATTEMPTS)
            for frame in frames:
                app.feed(Event.from_wire(frame))
            assert [(f["offset"], f["attempt"]) for f in frames] == [
                (second["offset"], attempt) for attempt in range(1, MAX_ATTEMPTS + 1)
            ]
            sends = _sends(proxy, second["offset"])
            assert [attempt for _, attempt in sends] == list(range(1, MAX_ATTEMPTS + 1))
            gaps = [later - earlier for (earlier, _), (later, _) in itertools.pairwise(sends)]
            bounds = [
                (ACK_TIMEOUT_S + b * (1 - JITTER), ACK_TIMEOUT_S + b * (1 + JITTER) + LATE_S)
                for b in BACKOFF_S
            ]
            for k, (gap, (low, high)) in enumerate(zip(gaps, bounds, strict=True), start=1):
                assert low - EARLY_S <= gap <= high, f"attempt {k + 1} came {gap:.3f}s after {k}"
            dead_letter_after = failed_seen_at - sends[-1][0]
            assert ACK_TIMEOUT_S - EARLY_S <= dead_letter_after <= ACK_TIMEOUT_S + 2 * LATE_S

            assert failed["type"] == "message.failed"
            assert failed["data"] | {"dead_letter_id": None} == {
                "dead_letter_id": None,
                "channel": CHANNEL,
                "offset": second["offset"],
                "event_id": second["id"],
                "type": EVENT_TYPE,
                "connection_id": info["connection_id"],
                "attempts": MAX_ATTEMPTS,
            }
            page = (await http.get("/api/v1/apix/dead-letters", params={"channel": CHANNEL})).json()
            assert [(d["offset"], d["attempts"], d["status"]) for d in page["items"]] == [
                (second["offset"], MAX_ATTEMPTS, "pending")
            ]
            assert page["items"][0]["id"] == failed["data"]["dead_letter_id"]
            assert page["items"][0]["event"]["data"] == {"n": 2}
            assert (await client.command("ack", channel=CHANNEL, offset=second["offset"]))["ok"]

            # A stall past the ack timeout that ends before the schedule does: the client
            # gets the redelivery, acknowledges it, and nothing is dead-lettered.
            proxy.stall()
            stalled_at = time.monotonic()
            third = await _publish(http, 3)
            await _until(lambda: len(_sends(proxy, third["offset"])) == 2, 10)
            proxy.release()
            short_stall_s = time.monotonic() - stalled_at
            frames = await client.events(2)
            assert [f["attempt"] for f in frames] == [1, 2]
            for frame in frames:
                app.feed(Event.from_wire(frame))
            assert (await client.command("ack", channel=CHANNEL, offset=third["offset"]))["ok"]
            # Attempt 3 would have left by now (and a dead letter needs attempt 4 first).
            await asyncio.sleep(ACK_TIMEOUT_S + BACKOFF_S[1] * (1 + JITTER) + LATE_S)
            assert [attempt for _, attempt in _sends(proxy, third["offset"])] == [1, 2]
            assert [f for f in client.frames if f.get("op") == "event"] == []
            assert [f for f in monitor.frames if f.get("op") == "event"] == []
            page = (await http.get("/api/v1/apix/dead-letters", params={"channel": CHANNEL})).json()
            assert [d["offset"] for d in page["items"]] == [second["offset"]]
    finally:
        await proxy.close()

    delivered = [n for _, _, n in app.seen]
    assert delivered == [1, 2, 3]  # each once, in order, after the SDK's de-duplication
    record_summary(
        report(
            "client-stall",
            {
                "published": 3,
                "lost": 0,
                "duplicated": 0,
                "out_of_order": 0,
                "raw_redeliveries": app.raw_duplicates,
                "attempts": MAX_ATTEMPTS,
                "ack_timeout_s": ACK_TIMEOUT_S,
                "backoff_s": BACKOFF_S,
                "gaps_s": [round(g, 3) for g in gaps],
                "expected_gaps_s": [[round(lo, 3), round(hi - LATE_S, 3)] for lo, hi in bounds],
                "dead_letter_after_s": round(dead_letter_after, 3),
                "long_stall_s": round(long_stall_s, 3),
                "short_stall_s": round(short_stall_s, 3),
                "total_s": round(time.monotonic() - started, 2),
            },
        )
    )

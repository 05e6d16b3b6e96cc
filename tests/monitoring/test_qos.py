"""Quality of service: under send-buffer pressure, low-priority frames with a coalescing key
give way to newer ones; high-priority and other frames are never dropped."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import httpx
import pytest
import websockets

from apix.config import RealtimeSettings, Settings
from apix.realtime.broker import event_frame, event_payload
from apix.realtime.connection import SendQueue
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import Account, new_org_admin
from tests.monitoring.conftest import METRICS_TOKEN, monitoring_settings
from tests.realtime.raw import Raw

_offsets = iter(range(1, 1_000_000))


def _frame(
    channel: str, event_type: str, data: Any, actor: str = "u1", *, presence: bool = False
) -> str:
    ms = int(time.time() * 1000)
    payload = event_payload(f"evt_{next(_offsets)}", event_type, ms, data, {"actor": actor})
    frame = event_frame(channel, f"{ms}-{next(_offsets)}", "ep", payload)
    if presence:
        frame = frame.replace(f'"offset":"{ms}-', '"offset":null,"x":"', 1)
    return frame


async def _drain(frames: list[str]) -> tuple[SendQueue, list[dict[str, Any]]]:
    """Queue ``frames`` while the writer is stuck on the first, then let it all go."""
    sent: list[str] = []
    gate = asyncio.Event()

    async def send(frame: str) -> None:
        await gate.wait()
        sent.append(frame)

    queue = SendQueue(40_000, lambda _dropped: pytest.fail("overflow"))
    queue.start(send)
    for frame in frames:
        queue.push(frame)
        await asyncio.sleep(0)
    gate.set()
    await asyncio.wait_for(queue.wait_empty(), 5)
    assert not queue.busy
    queue.close()
    return queue, [json.loads(f) for f in sent]


async def test_below_pressure_nothing_is_coalesced() -> None:
    frames = [_frame("room:a", "cursor.move", {"n": n}) for n in range(20)]
    queue, sent = await _drain(frames)
    assert [e["data"]["n"] for e in sent] == list(range(20))
    assert queue.coalesced == 0


async def test_under_pressure_only_keyed_low_priority_frames_coalesce() -> None:
    filler = [_frame("agents:x", "agent.note", {"pad": "x" * 1000, "n": n}) for n in range(12)]
    frames = [
        *filler,
        *(_frame("room:a", "cursor.move", {"n": n}, "u1") for n in range(30)),
        *(_frame("room:a", "cursor.move", {"n": n}, "u2") for n in range(5)),
        *(_frame("room:a", "chat.message", {"n": n}, "u1") for n in range(5)),
        *(_frame("user:u1", "cursor.move", {"n": n}) for n in range(5)),  # HIGH
        *(_frame("agents:x", "cursor.move", {"n": n}) for n in range(5)),  # NORMAL
        _frame("room:a", "presence.join", {"connection_id": "c1"}, presence=True),
        _frame("room:a", "presence.join", {"connection_id": "c2"}, presence=True),
        _frame("room:a", "presence.leave", {"connection_id": "c1"}, presence=True),
        _frame("room:a", "cursor.move", {"n": 99}, "u1"),
    ]
    queue, sent = await _drain(frames)

    def of(channel: str, event_type: str, actor: str | None = None) -> list[int]:
        return [
            e["data"]["n"]
            for e in sent
            if e["channel"] == channel
            and e["type"] == event_type
            and (actor is None or e["meta"]["actor"] == actor)
        ]

    assert of("room:a", "cursor.move", "u1") == [99]  # the newest state wins
    assert of("room:a", "cursor.move", "u2") == [4]
    assert of("room:a", "chat.message") == list(range(5))  # history, not state: all kept
    assert of("user:u1", "cursor.move") == list(range(5))  # high priority: never coalesced
    assert of("agents:x", "cursor.move") == list(range(5))  # normal priority: all kept
    assert len(of("agents:x", "agent.note")) == 12
    presence = [(e["type"], e["data"]["connection_id"]) for e in sent if e["offset"] is None]
    assert presence == [("presence.join", "c2"), ("presence.leave", "c1")]
    assert queue.coalesced == 30 + 4 + 1
    # Order within a channel is kept: the replacement takes the place of the newest.
    room = [e for e in sent if e["channel"] == "room:a" and e["offset"] is not None]
    assert room[-1]["data"] == {"n": 99}


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(
        servers,
        monitoring=monitoring_settings(),
        realtime=RealtimeSettings(send_buffer_bytes=400_000),
    )


async def _publish(client: httpx.AsyncClient, admin: Account, channel: str, **body: Any) -> None:
    response = await client.post(
        f"/api/v1/apix/channels/{channel}/events", headers=admin.headers, json=body
    )
    assert response.status_code == 201, response.text


async def test_a_slow_reader_gets_the_newest_cursor_and_every_high_priority_event(
    client: httpx.AsyncClient, live: LiveServer, settings: Settings
) -> None:
    admin = await new_org_admin(client)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", live.port))
    async with websockets.connect(live.ws, sock=sock, max_queue=1, open_timeout=5) as ws:
        raw = Raw(ws)
        hello = await raw.connect(admin.access_token)
        await raw.subscribe("room:board")
        await raw.subscribe("user:me")
        await raw.subscribe("agents:fill")
        connection = live.app.state.gateway.connections[hello["connection_id"]]
        server_socket = connection.socket.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        pressure = settings.realtime.send_buffer_bytes // 4
        # The client stops reading; fill its pipe until frames wait in the server's queue.
        fillers = 0
        while connection.queue.size < pressure:
            await _publish(client, admin, "agents:fill", type="filler", data={"pad": "x" * 8000})
            fillers += 1
            assert fillers < 200, "the connection never came under pressure"
            await asyncio.sleep(0.01)
        for n in range(40):
            await _publish(client, admin, "room:board", type="cursor.move", data={"n": n})
        for n in range(5):
            await _publish(client, admin, f"user:{admin.user_id}", type="inbox.item", data={"n": n})
        assert connection.queue.coalesced >= 39 - 1
        cursors: list[int] = []
        inbox: list[int] = []
        while len(inbox) < 5 or not cursors or cursors[-1] != 39:
            (event,) = await raw.events(1, timeout=10)
            if event["type"] == "cursor.move":
                cursors.append(event["data"]["n"])
            elif event["type"] == "inbox.item":
                inbox.append(event["data"]["n"])
        assert inbox == list(range(5))
        assert len(cursors) < 40
        assert cursors == sorted(cursors)
        # Still connected: coalescing spared it the slow-consumer close.
        assert (await raw.command("ping"))["ok"] is True

    await asyncio.sleep(0.3)
    response = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert 'apix_qos_coalesced_total{namespace="room"}' in response.text

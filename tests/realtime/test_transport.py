"""The gateway's own WebSocket protocol (`apix.realtime.transport`), checked on the wire:
what it answers at the upgrade, how it reads frames (fragments, invalid UTF-8, commands
sent faster than they run) and that the ASGI endpoint serves the same protocol on
uvicorn's own WebSocket implementation."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import struct
import time
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from apix.app import create_app
from apix.realtime import transport
from tests.conftest import LiveServer, Servers, make_settings, serve_app
from tests.identity.factories import new_org_admin
from tests.realtime.raw import Stream, connected, hand_command, hand_upgrade, raw_socket


async def test_an_upgrade_on_another_path_is_404_in_the_error_model(live: LiveServer) -> None:
    url = live.ws.replace("/api/v1/apix/ws", "/api/v1/apix/nowhere")
    with pytest.raises(InvalidStatus) as refused:
        async with raw_socket(url):
            pass
    response = refused.value.response
    assert response.status_code == 404
    assert json.loads(response.body)["error"]["code"] == "not_found"


async def test_an_upgrade_while_the_node_shuts_down_is_503_in_the_error_model(
    live: LiveServer,
) -> None:
    await live.app.state.gateway.shutdown_connections()  # the lifespan's first step at stop
    with pytest.raises(InvalidStatus) as refused:
        async with raw_socket(live.ws):
            pass
    response = refused.value.response
    assert response.status_code == 503
    assert json.loads(response.body)["error"]["code"] == "unavailable"


async def test_a_fragmented_command_is_read_as_one_message(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        frame = json.dumps(
            {
                "op": "connect",
                "id": 1,
                "token": admin.access_token,
                "client": {"type": "API_CLIENT"},
            }
        )
        third = len(frame) // 3
        await raw.ws.send([frame[:third], frame[third : 2 * third], frame[2 * third :]])
        reply = await raw.recv()
        assert reply["id"] == 1
        assert reply["ok"], reply
        assert reply["result"]["type"] == "connection.established"


async def test_a_binary_message_is_a_bad_request_and_the_connection_stays(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.ws.send(b'{"op":"ping","id":5}')
        reply = await raw.recv()
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        pong = await raw.command("ping")
        assert pong["ok"] is True


def _client_frame(opcode: int, payload: bytes) -> bytes:
    """A final, masked client frame (RFC 6455 section 5.2), payload under 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


async def _upgrade(port: int) -> Stream:
    status, _, stream = await hand_upgrade(port)
    if not status.startswith(b"HTTP/1.1 101"):
        stream[1].close()
    assert status.startswith(b"HTTP/1.1 101"), status
    return stream


async def _read_close_code(reader: asyncio.StreamReader) -> int:
    """Skip frames up to the server's close frame; its code."""
    while True:
        head = await asyncio.wait_for(reader.readexactly(2), 5)
        size = head[1] & 0x7F
        if size == 126:
            size = struct.unpack("!H", await reader.readexactly(2))[0]
        elif size == 127:
            size = struct.unpack("!Q", await reader.readexactly(8))[0]
        payload = await reader.readexactly(size)
        if head[0] & 0x0F == 0x8:
            return int(struct.unpack("!H", payload[:2])[0])


@pytest.mark.parametrize(
    ("opcode", "payload", "code"),
    [
        (0x1, b'{"op":"ping","x":"\xff\xfe"}', 1007),  # a text message that is not UTF-8
        (0x3, b"?", 1002),  # a reserved opcode
    ],
    ids=["invalid-utf8", "reserved-opcode"],
)
async def test_a_malformed_frame_closes_with_the_rfc_code(
    live: LiveServer, opcode: int, payload: bytes, code: int
) -> None:
    reader, writer = await _upgrade(live.port)
    try:
        writer.write(_client_frame(opcode, payload))
        assert await _read_close_code(reader) == code
    finally:
        writer.close()


async def test_commands_sent_faster_than_they_run_are_all_answered_in_order(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    """More commands than the inbox holds before reading pauses: none lost, none reordered."""
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe("room:burst")
        count = 120
        for i in range(count):
            op = "history" if i % 2 else "ping"  # one with I/O, one without
            frame: dict[str, Any] = {"op": op, "id": f"c{i}"}
            if op == "history":
                frame["channel"] = "room:burst"
            await raw.send(frame)
        replies = [await raw.recv() for _ in range(count)]
    assert [r["id"] for r in replies] == [f"c{i}" for i in range(count)]
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]


async def test_the_asgi_endpoint_serves_the_protocol_on_uvicorns_own_websockets(
    app: Any, client: httpx.AsyncClient, settings: Any
) -> None:
    """Another server than `apix serve`'s: no fast path, same protocol."""
    admin = await new_org_admin(client)
    async with serve_app(app, settings, ws="websockets-sansio") as other:
        async with connected(other.ws, admin.access_token) as raw:
            await raw.subscribe("room:asgi")
            published = await client.post(
                "/api/v1/apix/channels/room:asgi/events",
                headers={"authorization": f"Bearer {admin.access_token}"},
                json={"type": "note", "data": {"n": 1}},
            )
            assert published.status_code == 201, published.text
            (event,) = await raw.events(1)
            assert event["data"] == {"n": 1}
        # A client that does not connect first is refused and closed 4001.
        async with raw_socket(other.ws) as raw:
            await raw.send({"op": "ping", "id": 1})
            reply = await raw.recv()
            assert reply["error"]["code"] == "unauthorized"
            with pytest.raises(ConnectionClosed) as closed:
                await raw.recv()
            assert closed.value.rcvd is not None
            assert closed.value.rcvd.code == 4001


async def test_a_raw_client_gets_its_reply_after_the_upgrade(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    """The hand-made client above speaks valid WebSocket: its `connect` is answered."""
    admin = await new_org_admin(client)
    reader, writer = await _upgrade(live.port)
    try:
        command = {"op": "connect", "id": 1, "token": admin.access_token}
        # Over 125 bytes: sent with a 16-bit length.
        reply = await hand_command((reader, writer), {**command, "client": {"type": "API_CLIENT"}})
        assert reply["id"] == 1
        assert reply["ok"], reply
    finally:
        writer.close()


async def test_a_client_that_never_answers_the_close_is_cut_off(
    servers: Servers, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server's close frame (here 4008: no connect in time) is not answered: the TCP
    connection ends anyway once the close timeout passes."""
    monkeypatch.setattr(transport, "CLOSE_TIMEOUT_S", 0.5)
    settings = make_settings(servers, realtime={"connect_timeout_ms": 200})
    app = create_app(settings)
    async with app.router.lifespan_context(app), serve_app(app, settings) as live:
        reader, writer = await _upgrade(live.port)
        try:
            assert await _read_close_code(reader) == 4008
            started = time.monotonic()
            with contextlib.suppress(ConnectionResetError):
                rest = await asyncio.wait_for(reader.read(), 5)
                assert rest == b""
            assert time.monotonic() - started < 3
        finally:
            writer.close()

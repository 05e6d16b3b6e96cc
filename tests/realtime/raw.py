"""A raw protocol client for conformance tests: the `websockets` package and JSON, nothing of
ours (tests must not depend on `apix.client`)."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

_ids = itertools.count(1)


class Raw:
    """One WebSocket: send commands, await their replies, collect other frames."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []  # unprompted frames (events, pings, ...)

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        return json.loads(raw)  # type: ignore[no-any-return]

    async def command(self, op: str, timeout: float = 5.0, **fields: Any) -> dict[str, Any]:
        """Send a command with a fresh id; return its reply (other frames are kept)."""
        command_id = next(_ids)
        await self.send({"op": op, "id": command_id, **fields})
        while True:
            frame = await self.recv(timeout)
            if frame.get("op") == "reply" and frame.get("id") == command_id:
                return frame
            self.frames.append(frame)

    async def connect(self, token: str, **fields: Any) -> dict[str, Any]:
        fields.setdefault("client", {"type": "API_CLIENT", "name": "conformance"})
        reply = await self.command("connect", token=token, **fields)
        assert reply["ok"], reply
        return reply["result"]  # type: ignore[no-any-return]

    async def subscribe(self, channel: str, **fields: Any) -> dict[str, Any]:
        reply = await self.command("subscribe", channel=channel, **fields)
        assert reply["ok"], reply
        return reply["result"]  # type: ignore[no-any-return]

    async def events(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` event frames (including ones already collected)."""
        out = [f for f in self.frames if f.get("op") == "event"]
        self.frames = [f for f in self.frames if f.get("op") != "event"]
        while len(out) < count:
            frame = await self.recv(timeout)
            if frame.get("op") == "event":
                out.append(frame)
            else:
                self.frames.append(frame)
        extra = out[count:]
        self.frames = extra + self.frames
        return out[:count]

    async def closed(self, timeout: float = 5.0) -> tuple[int | None, str]:
        """Read until the server closes; return (code, reason)."""
        try:
            while True:
                frame = await self.recv(timeout)
                self.frames.append(frame)
        except websockets.ConnectionClosed as closed:
            if closed.rcvd is None:
                return None, ""
            return closed.rcvd.code, closed.rcvd.reason


@asynccontextmanager
async def raw_socket(url: str, **kwargs: Any) -> AsyncIterator[Raw]:
    kwargs.setdefault("open_timeout", 5)
    async with websockets.connect(url, **kwargs) as ws:
        yield Raw(ws)


@asynccontextmanager
async def connected(url: str, token: str, **fields: Any) -> AsyncIterator[Raw]:
    async with raw_socket(url) as raw:
        await raw.connect(token, **fields)
        yield raw


# --- by hand: a client that writes the upgrade request and its frames itself ------------

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def hand_upgrade(port: int, extra: str = "") -> tuple[bytes, str, Stream]:
    """Send an upgrade request (``extra``: more header lines) to the gateway's path; the
    answer's head (status line and headers), the key sent, and the open stream."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            "GET /api/v1/apix/ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    except BaseException:
        writer.close()
        raise
    return head, key, (reader, writer)


async def hand_command(stream: Stream, command: dict[str, Any]) -> dict[str, Any]:
    """Send ``command`` as one masked text frame (RFC 6455 section 5.2) and read the next
    frame from the server as JSON."""
    reader, writer = stream
    data = json.dumps(command).encode()
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(data))
    if len(data) < 126:
        head = struct.pack("!BB", 0x81, 0x80 | len(data))
    else:  # a 16-bit length
        head = struct.pack("!BBH", 0x81, 0x80 | 126, len(data))
    writer.write(head + mask + masked)
    first = await asyncio.wait_for(reader.readexactly(2), 5)
    size = first[1] & 0x7F
    if size == 126:
        size = struct.unpack("!H", await reader.readexactly(2))[0]
    reply: dict[str, Any] = json.loads(await reader.readexactly(size))
    return reply

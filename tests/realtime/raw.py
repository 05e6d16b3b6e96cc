"""A raw protocol client for conformance tests: the `websockets` package and JSON, nothing of
ours (tests must not depend on `apix.client`)."""

from __future__ import annotations

import asyncio
import itertools
import json
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

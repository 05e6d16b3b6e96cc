"""The connection record in PostgreSQL (`apix_connection`) follows the heartbeat at most once
per window (a minute; shortened here), not on every pong; the disconnect writes it exactly."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from apix.config import RealtimeSettings, Settings
from apix.identity.runtime import IdentityRuntime
from apix.realtime import gateway
from apix.realtime.models import ApixConnection
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import new_org_admin
from tests.realtime.raw import Raw, raw_socket

WINDOW_S = 2.0  # stands for `_RTT_SHOW_S` (60 s)


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # A ping 100 ms after each pong, and the registry flushing often: were a pong to mark
    # the record for writing, the row would change many times within the window.
    return make_settings(
        servers,
        realtime=RealtimeSettings(ping_interval_ms=100, pong_timeout_ms=5000, registry_flush_s=0.1),
    )


async def _next_ping(raw: Raw) -> dict[str, Any]:
    """The next server ping (other frames are kept). The server pings only once it has
    handled the last pong: with the ping held unanswered, no pong is in flight."""
    while True:
        frame = await raw.recv(timeout=5)
        if frame.get("op") == "ping":
            return frame
        raw.frames.append(frame)


async def _pong(raw: Raw, ping: dict[str, Any]) -> dict[str, Any]:
    """Answer ``ping``; return the next one, once the pong has been handled."""
    await raw.send({"op": "pong", "ts": ping["ts"]})
    return await _next_ping(raw)


async def _row(
    live: LiveServer, runtime: IdentityRuntime, org_id: str, connection_id: str
) -> tuple[datetime | None, str]:
    """The record as PostgreSQL holds it, once whatever the registry holds is written."""
    await live.app.state.gateway.registry.flush()
    async with runtime.database.transaction(uuid.UUID(org_id)) as uow:
        row = (
            await uow.session.execute(
                select(ApixConnection.last_heartbeat_at, ApixConnection.status).where(
                    ApixConnection.id == connection_id
                )
            )
        ).one()
    return row.last_heartbeat_at, row.status


async def test_pongs_within_the_window_leave_the_row_alone_and_the_disconnect_is_exact(
    client: httpx.AsyncClient,
    live: LiveServer,
    runtime: IdentityRuntime,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(gateway, "_RTT_SHOW_S", WINDOW_S)
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        hello = await raw.connect(admin.access_token)
        connection = live.app.state.gateway.connections[hello["connection_id"]]
        record = connection.record

        async def row() -> tuple[datetime | None, str]:
            return await _row(live, runtime, admin.org_id, connection.id)

        # The first pong is written at once.
        ping = await _next_ping(raw)
        ping = await _pong(raw, ping)
        shown_at = time.monotonic()
        first = record.last_heartbeat_at
        assert first is not None
        assert await row() == (first, "CONNECTED")

        # Inside the window: every pong moves the heartbeat in memory, none rewrites the row
        # (though the registry flushes every 0.1 s).
        pongs = 0
        while time.monotonic() - shown_at < WINDOW_S / 2:
            ping = await _pong(raw, ping)
            pongs += 1
        assert pongs >= 3
        assert record.last_heartbeat_at > first
        assert time.monotonic() - shown_at < WINDOW_S, "too slow to test inside the window"
        assert await row() == (first, "CONNECTED")

        # Past the window: the next pong is written (the ping it answers was held back).
        await asyncio.sleep(shown_at + WINDOW_S + 0.1 - time.monotonic())
        ping = await _pong(raw, ping)
        second = record.last_heartbeat_at
        assert second > first
        assert await row() == (second, "CONNECTED")

        # A new window: the next pongs are not written again...
        for _ in range(3):
            ping = await _pong(raw, ping)
        last = record.last_heartbeat_at
        assert last > second
        assert await row() == (second, "CONNECTED")

    # ...until the disconnect, which writes the last heartbeat exactly.
    deadline = time.monotonic() + 5
    while connection.finishing is None:
        assert time.monotonic() < deadline, "the server never saw the disconnect"
        await asyncio.sleep(0.02)
    await asyncio.wait_for(asyncio.shield(connection.finishing), 5)
    assert await row() == (last, "DISCONNECTED")


async def test_a_flush_waits_for_the_one_already_writing(
    client: httpx.AsyncClient, live: LiveServer, runtime: IdentityRuntime
) -> None:
    """`flush` returns once what was marked before it is in PostgreSQL, even when another
    flush (the loop's) had taken it and was still writing: it used to return at once, with
    nothing left to write, and a read just after could see the row as it was."""
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        hello = await raw.connect(admin.access_token)
        registry = live.app.state.gateway.registry
        record = live.app.state.gateway.connections[hello["connection_id"]].record
        await registry.flush()
        for _ in range(5):
            record.last_heartbeat_at = datetime.now(UTC)
            registry.show_live(record)
            writing = asyncio.create_task(registry.flush())
            await asyncio.sleep(0)  # it has taken the record and is writing
            await registry.flush()
            async with runtime.database.transaction(uuid.UUID(admin.org_id)) as uow:
                written = await uow.session.scalar(
                    select(ApixConnection.last_heartbeat_at).where(ApixConnection.id == record.id)
                )
            await writing
            assert written == record.last_heartbeat_at

"""The connection list's `rtt_ms`: the first pong shows its round trip at once; later pongs are
measured every time but shown at most once per window (a minute; shortened here)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from apix.config import RealtimeSettings, Settings
from apix.realtime import gateway
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import Account, new_org_admin
from tests.realtime.raw import Raw, connected

CONNECTIONS = "/api/v1/apix/connections"
WINDOW_S = 2.5  # stands for `_RTT_SHOW_S` (60 s)


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # Pings follow pongs closely; a pong may take its time (the test holds some back).
    return make_settings(
        servers, realtime=RealtimeSettings(ping_interval_ms=100, pong_timeout_ms=5000)
    )


async def _ping(raw: Raw) -> tuple[dict[str, Any], float]:
    """The next server ping, and when it arrived."""
    while True:
        frame = await raw.recv(timeout=5)
        if frame.get("op") == "ping":
            return frame, time.monotonic()
        raw.frames.append(frame)


async def _shown_rtt(client: httpx.AsyncClient, admin: Account) -> float | None:
    response = await client.get(CONNECTIONS, headers=admin.headers)
    assert response.status_code == 200, response.text
    (mine,) = response.json()
    return mine["rtt_ms"]  # type: ignore[no-any-return]


async def test_rtt_is_shown_at_once_then_at_most_once_per_window(
    client: httpx.AsyncClient, live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gateway, "_RTT_SHOW_S", WINDOW_S)
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        assert await _shown_rtt(client, admin) is None  # nothing measured yet

        # The first pong, answered at once: its round trip is shown at once. (The server
        # pings again only after handling a pong, so each next ping says it was handled.)
        ping, _ = await _ping(raw)
        await raw.send({"op": "pong", "ts": ping["ts"]})
        shown_at = time.monotonic()
        ping, _ = await _ping(raw)
        first = await _shown_rtt(client, admin)
        assert first is not None

        # Inside the window: a much slower round trip is measured, not shown.
        await asyncio.sleep(0.6)
        await raw.send({"op": "pong", "ts": ping["ts"]})
        ping, arrived = await _ping(raw)
        assert time.monotonic() - shown_at < WINDOW_S, "too slow to test inside the window"
        assert await _shown_rtt(client, admin) == first

        # Past the window: the next pong's round trip (held back over a second) is shown.
        await asyncio.sleep(shown_at + WINDOW_S + 0.2 - time.monotonic())
        held_ms = (time.monotonic() - arrived) * 1000
        await raw.send({"op": "pong", "ts": ping["ts"]})
        await _ping(raw)
        later = await _shown_rtt(client, admin)
        assert later is not None
        assert later != first
        assert later >= held_ms - 1  # the server's round trip spans the client's hold

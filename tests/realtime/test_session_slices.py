"""Session positions are saved a tenth of the connections at a time: each turn of the save
loop writes one slice, and within one cycle (5 s; shortened here) every session that moved
is saved once."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from apix.app import create_app
from apix.config import Settings
from apix.realtime import gateway
from apix.realtime.delivery import _session_key
from tests.conftest import LiveServer
from tests.identity.factories import new_org_admin
from tests.realtime.raw import Raw, raw_socket
from tests.realtime.test_redelivery_idle import _commands_on

CYCLE_S = 1.0  # stands for `_SESSION_SAVE_S` (5 s): a turn every 0.1 s
SLICES = 10
CONNECTIONS = 2 * SLICES


@pytest.fixture
async def app(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Any]:
    monkeypatch.setattr(gateway, "_SESSION_SAVE_S", CYCLE_S)  # read when the loop is made
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


def _turns(ttls_ms: list[int]) -> list[list[int]]:
    """Connections (indexes into ``ttls_ms``) grouped by the save that wrote them: a key's
    remaining time to live tells when it was last set; turns are ``CYCLE_S / SLICES`` apart."""
    order = sorted(range(len(ttls_ms)), key=lambda i: ttls_ms[i])
    turns = [[order[0]]]
    for previous, i in itertools.pairwise(order):
        if ttls_ms[i] - ttls_ms[previous] > CYCLE_S / SLICES * 1000 / 2:
            turns.append([])
        turns[-1].append(i)
    return turns


async def test_each_turn_saves_one_slice_and_a_cycle_saves_every_session(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    sessions = live.app.state.gateway.sessions
    async with AsyncExitStack() as stack:
        raws: list[Raw] = []
        tokens: list[str] = []
        for _ in range(CONNECTIONS):
            raw = await stack.enter_async_context(raw_socket(live.ws))
            tokens.append((await raw.connect(admin.access_token))["session"])
            channel = (await raw.subscribe("room:slices"))["channel"]
            raws.append(raw)

        published = await client.post(
            "/api/v1/apix/channels/room:slices/events",
            headers=admin.headers,
            json={"type": "note", "data": {"n": 1}},
        )
        assert published.status_code == 201, published.text
        offset = published.json()["offset"]
        for raw in raws:
            (event,) = await raw.events(1)
            assert event["offset"] == offset

        async def saved_offsets() -> list[str | None]:
            out: list[str | None] = []
            for token in tokens:
                session = await sessions.load(token)
                assert session is not None
                (sub,) = session.subscriptions
                assert sub.channel == channel
                out.append(sub.offset)
            return out

        # Within a cycle (with room for a loaded machine) every session holds the event.
        deadline = time.monotonic() + 3 * CYCLE_S
        while (offsets := await saved_offsets()) != [offset] * CONNECTIONS:
            assert time.monotonic() < deadline, f"not saved within a cycle: {offsets}"
            await asyncio.sleep(0.02)

        # Each was saved once since the event, by one of ten turns, two connections a turn.
        async with live.app.state.gateway.redis.pipeline(transaction=True) as pipe:
            for token in tokens:
                pipe.pttl(_session_key(token))
            ttls_ms = [int(t) for t in await pipe.execute()]
        turns = _turns(ttls_ms)
        assert sorted(len(t) for t in turns) == [2] * SLICES, turns


async def test_a_new_subscription_is_saved_once_not_again_by_the_save_loop(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    """Subscribing saves the session; the loop's next turns see nothing moved."""
    admin = await new_org_admin(client)
    redis = live.app.state.gateway.redis
    async with (
        _commands_on(redis, "apix:sess:") as seen,
        raw_socket(live.ws) as raw,
    ):
        token = (await raw.connect(admin.access_token))["session"]
        await raw.subscribe("room:saved-once")
        await asyncio.sleep(2.5 * CYCLE_S)  # every slice's turn comes twice
        saves = [c for c in seen if c.startswith("SET") and token in c]
    assert len(saves) == 1, saves

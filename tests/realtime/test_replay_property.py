"""Replay then live, no gap and no duplicate (PROTOCOL.md section 5), as a property.

While a publisher writes to a channel, subscribers join at random moments, each with a
random `since` among the offsets published so far (or none, or the very start). Each must
end up with exactly the channel's events after its position, in order, once each.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import LiveServer
from tests.identity.factories import Account, new_org_admin
from tests.realtime.raw import Raw, connected

CHANNELS = "/api/v1/apix/channels"
TOTAL = 30  # events per example
_names = itertools.count()


def okey(offset: str) -> tuple[int, int]:
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq)


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


# A join: (how many events are published when it subscribes, its `since`):
# None: no since (live from now); 0: since "0-0" (everything); j: after the j-th event.
JOIN = st.tuples(
    st.integers(min_value=0, max_value=TOTAL),
    st.one_of(st.none(), st.integers(min_value=0, max_value=TOTAL)),
)


async def _collect_until(raw: Raw, channel: str, offset: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    deadline = time.monotonic() + 10
    while not out or okey(out[-1]["offset"]) < okey(offset):
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"stopped at {out[-1:]} before {offset}"
        (event,) = await raw.events(1, timeout=remaining)
        assert event["channel"] == channel
        out.append(event)
    return out


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(joins=st.lists(JOIN, min_size=1, max_size=5), pace=st.sampled_from([0.0, 0.001, 0.003]))
async def test_every_subscriber_gets_exactly_the_events_after_its_position(
    client: httpx.AsyncClient,
    live: LiveServer,
    admin: Account,
    joins: list[tuple[int, int | None]],
    pace: float,
) -> None:
    channel = f"room:prop-{next(_names)}"
    published: list[dict[str, Any]] = []
    reached = [asyncio.Event() for _ in range(TOTAL + 1)]
    reached[0].set()

    async def publisher() -> None:
        for n in range(TOTAL):
            response = await client.post(
                f"{CHANNELS}/{channel}/events",
                headers=admin.headers,
                json={"type": "prop.event", "data": n},
            )
            assert response.status_code == 201, response.text
            published.append(response.json())
            reached[len(published)].set()
            await asyncio.sleep(pace)

    async def join(raw: Raw, at: int, since_index: int | None) -> tuple[str, dict[str, Any]]:
        await reached[at].wait()
        fields: dict[str, Any] = {}
        if since_index is not None:
            index = min(since_index, len(published))
            if index == 0:
                fields["since"] = {"offset": "0-0"}
            else:
                position = published[index - 1]
                fields["since"] = {"offset": position["offset"], "epoch": position["epoch"]}
        added = await raw.subscribe(channel, **fields)
        after = fields["since"]["offset"] if "since" in fields else added["position"]["offset"]
        return after, added

    async with AsyncExitStack() as stack:
        raws = [
            await stack.enter_async_context(connected(live.ws, admin.access_token)) for _ in joins
        ]
        task = asyncio.create_task(publisher())
        try:
            joined = await asyncio.gather(
                *(join(raw, at, since) for raw, (at, since) in zip(raws, joins, strict=True))
            )
        finally:
            await task
        history = (
            await client.get(
                f"{CHANNELS}/{channel}/events", headers=admin.headers, params={"limit": 1000}
            )
        ).json()["events"]
        assert [e["offset"] for e in history] == [p["offset"] for p in published]
        assert [e["data"] for e in history] == list(range(TOTAL))
        epoch = published[0]["epoch"]
        last = published[-1]["offset"]
        for raw, (after, added), spec in zip(raws, joined, joins, strict=True):
            expected = [e["offset"] for e in history if okey(e["offset"]) > okey(after)]
            assert added["recovered"] is True, (spec, added)
            assert added["position"]["epoch"] == epoch
            replayed = [o for o in expected if okey(o) <= okey(added["position"]["offset"])]
            assert added["replayed"] == len(replayed), (spec, added)
            got = await _collect_until(raw, channel, last) if expected else []
            offsets = [e["offset"] for e in got]
            assert offsets == expected, (spec, after, added)
            assert all(e["epoch"] == epoch for e in got)
            # Nothing more after the last event.
            assert not [f for f in raw.frames if f.get("op") == "event"], spec

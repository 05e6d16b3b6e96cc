"""Events PostgreSQL cannot store never hold back the archive: a batch it refuses is written
row by row, U+0000 becomes U+FFFD, and what it still refuses is dropped, so the events
after them (on every channel of the partition) are archived and trimming goes on."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text

from apix.config import DatabaseSettings
from apix.infra.database import Database
from apix.realtime.broker import Broker
from apix.realtime.channels import NAMESPACES, ChannelRef
from tests.conftest import LiveServer, Servers
from tests.identity.factories import new_org_admin
from tests.realtime.raw import connected
from tests.realtime.test_archive import settings, wait_archived  # noqa: F401 - the fixture
from tests.realtime.test_http_api import assert_error, events_url
from tests.realtime.test_protocol_channels import http_publish


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[Redis]:
    client = Redis.from_url(servers.redis_url)
    yield client
    await client.aclose()


async def test_events_postgresql_refuses_are_mended_or_dropped_and_hold_nothing_back(
    client: httpx.AsyncClient, servers: Servers, redis: Redis
) -> None:
    admin = await new_org_admin(client)
    channel = ChannelRef("agents:a1", NAMESPACES["agents"], "a1", admin.org_id)
    before = await http_publish(client, admin.headers, "agents:a1", data=1)
    # Published inside the platform (a tool's output, say): PostgreSQL's jsonb cannot hold
    # U+0000, in a value or a key.
    broker = Broker(redis, source="test", archive=True)
    nul = await broker.publish(channel, "tool.output", {"text": "a\x00b", "k\x00": ["\x00"]})
    # Entries queued for the same partition that PostgreSQL refuses however they are
    # written (an id longer than its column) or that cannot be read at all.
    queue = channel.archive_key
    fields = {"t": admin.org_id, "c": "agents:a1", "e": nul.epoch}
    event = b'{"id": "evt_%s", "type": "x", "ts": 1, "data": null}'
    await redis.xadd(queue, {**fields, "o": "1-1", "d": event % (b"9" * 80)})
    await redis.xadd(queue, {**fields, "o": "1-2", "d": b"{not json"})
    await redis.xadd(queue, {**fields, "o": "garbled", "d": event % b"1"})  # no position
    await redis.xadd(queue, {"t": "not-an-org"})
    # An organisation deleted meanwhile: its events' analytics minutes cannot be written.
    gone = {**fields, "t": str(uuid.uuid4()), "o": "1-3"}
    await redis.xadd(queue, {**gone, "d": event % b"2"})
    after = await http_publish(client, admin.headers, "agents:a1", data=2)

    rows = await wait_archived(servers, admin.org_id, 3)
    by_offset = {r[2]: r for r in rows}
    assert sorted(by_offset) == sorted([before["offset"], nul.offset, after["offset"]])
    assert by_offset[nul.offset][5] == {"text": "a\ufffdb", "k\ufffd": ["\ufffd"]}
    assert (by_offset[before["offset"]][5], by_offset[after["offset"]][5]) == (1, 2)
    # Every entry was taken off the queue, and the channel is marked archived up to the last
    # real position (a garbled one would have broken every later publish's trimming).
    assert await redis.xlen(queue) == 0
    assert (await redis.hget(channel.meta_key, "archived")) == after["offset"].encode()
    await http_publish(client, admin.headers, "agents:a1", data=3)
    assert len(await wait_archived(servers, admin.org_id, 4)) == 4
    # What was written is counted once, by either path (the counts share its statement).
    overview = (await client.get("/api/v1/analytics/overview", headers=admin.headers)).json()
    assert overview["events_by_namespace"] == {"agents": 4}


async def test_a_batch_of_several_organisations_is_archived_whole_and_counted_once(
    client: httpx.AsyncClient, servers: Servers
) -> None:
    """The batch path: PostgreSQL builds each organisation's rows from the events' JSON."""
    admins = [await new_org_admin(client) for _ in range(3)]
    sent = {
        a.org_id: [
            await http_publish(client, a.headers, f"sessions:s{n}", "chat.message", {"n": n})
            for n in range(4)
        ]
        for a in admins
    }
    for admin in admins:
        rows = await wait_archived(servers, admin.org_id, 4)
        assert sorted((r[0], r[2], r[3], r[4], r[5], r[6]) for r in rows) == sorted(
            (f"sessions:s{n}", e["offset"], e["id"], "chat.message", {"n": n}, f"s{n}")
            for n, e in enumerate(sent[admin.org_id])
        )
        overview = (await client.get("/api/v1/analytics/overview", headers=admin.headers)).json()
        assert overview["events_by_namespace"] == {"sessions": 4}
    assert uuid.UUID(admins[0].org_id)  # the rows were read under each org's own RLS


@pytest.mark.parametrize(
    "data",
    [{"text": "a\x00b"}, {"k\x00": 1}, ["\x00"], "\x00"],
    ids=["value", "key", "list", "string"],
)
async def test_clients_cannot_publish_what_the_archive_cannot_store(
    client: httpx.AsyncClient, live: LiveServer, data: object
) -> None:
    """U+0000 is refused where clients publish (HTTP and WebSocket), so the live event and
    its archived copy never differ; nothing is published."""
    admin = await new_org_admin(client)
    body = {"type": "a.b", "data": data}
    response = await client.post(events_url("room:x"), headers=admin.headers, json=body)
    assert_error(response, 400, {"bad_request"})
    assert "U+0000" in response.json()["error"]["message"]
    async with connected(live.ws, admin.access_token) as raw:
        reply = await raw.command("publish", channel="room:x", **body)
        assert (reply["ok"], reply["error"]["code"]) == (False, "bad_request"), reply
    history = (await client.get(events_url("room:x"), headers=admin.headers)).json()
    assert history["events"] == []


async def test_the_text_of_an_escape_is_not_u0000(
    client: httpx.AsyncClient, servers: Servers
) -> None:
    """A backslash followed by `u0000` is six ordinary characters: published and archived as
    they are."""
    admin = await new_org_admin(client)
    text = "\\u0000 and \\\\u0000"
    sent = await http_publish(client, admin.headers, "agents:a1", data={text: text})
    rows = await wait_archived(servers, admin.org_id, 1)
    assert [(r[2], r[5]) for r in rows] == [(sent["offset"], {text: text})]


async def test_entries_with_odd_metadata_are_archived_as_postgresql_reads_them(
    client: httpx.AsyncClient, servers: Servers, redis: Redis
) -> None:
    """Metadata that is not an object is stored as `{}`, and a session id that is not a
    string as its JSON text, whichever path writes the row."""
    admin = await new_org_admin(client)
    queue = ChannelRef("agents:a2", NAMESPACES["agents"], "a2", admin.org_id).archive_key
    fields = {"t": admin.org_id, "c": "agents:a2", "e": "e1"}
    odd = [
        b'{"id": "evt_1", "type": "x", "meta": [1]}',
        b'{"id": "evt_2", "type": "x", "meta": {"session_id": 5}}',
    ]
    for seq, event in enumerate(odd, start=1):
        await redis.xadd(queue, {**fields, "o": f"2-{seq}", "d": event})
        # The same again, with U+0000 in its data: written by the row-by-row path.
        nul = event.replace(b'"type"', b'"data": "\\u0000", "type"')
        await redis.xadd(queue, {**fields, "o": f"3-{seq}", "d": nul})
    rows = await wait_archived(servers, admin.org_id, 4)
    got = {r[2]: (r[5], r[6]) for r in rows}
    assert got == {
        "2-1": (None, None),
        "2-2": (None, "5"),
        "3-1": ("\ufffd", None),
        "3-2": ("\ufffd", "5"),
    }
    database_rows = await _metadata(servers, admin.org_id)
    assert database_rows == {
        "2-1": {},
        "2-2": {"session_id": 5},
        "3-1": {},
        "3-2": {"session_id": 5},
    }


async def _metadata(servers: Servers, org_id: str) -> dict[str, object]:
    database = Database(servers.database_url, DatabaseSettings())
    try:
        async with database.transaction(uuid.UUID(org_id)) as uow:
            result = await uow.session.execute(
                text("SELECT offset_ms || '-' || offset_seq, metadata FROM apix_event")
            )
            return {str(offset): metadata for offset, metadata in result.all()}
    finally:
        await database.dispose()

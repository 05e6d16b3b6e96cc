"""The durable event archive: every tenant event written once to PostgreSQL, trimming that
waits for it, and `since` recovery that reaches past the Redis stream into it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.app import create_app
from apix.config import DatabaseSettings, Settings, WorkerSettings
from apix.infra.database import Database
from apix.realtime.channels import PARTITIONS, archive_key, channel_prefix, partition_of
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import Account, new_org_admin
from tests.realtime.raw import connected
from tests.realtime.test_protocol_channels import http_history, http_publish

MAX_LEN = 1000  # what `agents:` keeps in Redis


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # This module's nodes run the archiver in-process, as `apix serve` does by default.
    return make_settings(
        servers,
        worker=WorkerSettings(embedded=True, lease_ms=1000),
        realtime={"ack_timeout_ms": 1500, "redelivery_backoff_ms": [100], "max_attempts": 2},
    )


async def publish_many(
    client: httpx.AsyncClient, account: Account, channels: list[str], count: int
) -> list[tuple[str, dict[str, Any]]]:
    """Publish ``count`` events round-robin over ``channels``, 16 at a time per channel."""
    published: list[tuple[str, dict[str, Any]]] = []
    for start in range(0, count, 16 * len(channels)):
        batch = [
            (channels[n % len(channels)], n)
            for n in range(start, min(count, start + 16 * len(channels)))
        ]
        # One channel's events must keep their order: publish each channel's share in turn.
        results = await asyncio.gather(
            *(
                _publish_in_order(client, account, ch, [n for c, n in batch if c == ch])
                for ch in channels
            )
        )
        for channel, events in zip(channels, results, strict=True):
            published.extend((channel, e) for e in events)
    return published


async def _publish_in_order(
    client: httpx.AsyncClient, account: Account, channel: str, numbers: list[int]
) -> list[dict[str, Any]]:
    return [await http_publish(client, account.headers, channel, data=n) for n in numbers]


async def archived_rows(servers: Servers, org_id: str) -> list[Any]:
    """The archive as the application role sees it for ``org_id`` (under row-level security)."""
    database = Database(servers.database_url, DatabaseSettings())
    try:
        async with database.transaction(uuid.UUID(org_id)) as uow:
            result = await uow.session.execute(
                text(
                    "SELECT channel, epoch, offset_ms || '-' || offset_seq, id, type, payload, "
                    "session_id FROM apix_event ORDER BY channel, offset_ms, offset_seq"
                )
            )
            return list(result.all())
    finally:
        await database.dispose()


async def wait_archived(
    servers: Servers, org_id: str, count: int, timeout: float = 30.0
) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        rows = await archived_rows(servers, org_id)
        if len(rows) >= count or time.monotonic() > deadline:
            return rows
        await asyncio.sleep(0.1)


async def test_every_event_is_archived_once_with_its_content(
    client: httpx.AsyncClient, servers: Servers
) -> None:
    admin = await new_org_admin(client)
    channels = ["agents:a1", "sessions:s1", "room:r1"]
    published = await publish_many(client, admin, channels, 90)
    rows = await wait_archived(servers, admin.org_id, 90)
    assert len(rows) == 90
    got = {(r[0], r[2]): r for r in rows}
    for channel, event in published:
        row = got[(channel, event["offset"])]
        assert (row[1], row[3], row[4]) == (event["epoch"], event["id"], "test.event")
        assert row[6] == ("s1" if channel == "sessions:s1" else None)
    assert sorted(r[5] for r in rows) == list(range(90))
    status = (await client.get("/api/v1/status")).json()
    assert status["archive"]["enabled"] is True
    assert status["archive"]["archivers"] >= 1


async def test_a_dead_lettered_event_is_marked_in_the_archive(
    client: httpx.AsyncClient, live: LiveServer, servers: Servers
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe("room:acks", ack=True)
        sent = await http_publish(client, admin.headers, "room:acks", data="never acked")
        assert [e["attempt"] for e in await raw.events(2, timeout=10)] == [1, 2]
        deadline = time.monotonic() + 10
        while True:
            states = await archived_ack_states(servers, admin.org_id, "room:acks")
            if (sent["offset"], "dead_lettered", 2) in states:
                break
            assert time.monotonic() < deadline, states
            await asyncio.sleep(0.1)


async def archived_ack_states(
    servers: Servers, org_id: str, channel: str
) -> list[tuple[str, str, int]]:
    database = Database(servers.database_url, DatabaseSettings())
    try:
        async with database.transaction(uuid.UUID(org_id)) as uow:
            result = await uow.session.execute(
                text(
                    "SELECT offset_ms || '-' || offset_seq, ack_state, retry_count FROM apix_event"
                )
            )
            return [(str(o), str(a), int(r)) for o, a, r in result.all()]
    finally:
        await database.dispose()


async def test_monitor_events_stay_in_redis_only(
    client: httpx.AsyncClient, live: LiveServer, servers: Servers
) -> None:
    """`monitor` is live telemetry kept an hour in its stream: a connect storm must not
    write a row per connect to the archive, while the organisation's other events still
    reach it."""
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as watcher:
        await watcher.subscribe("monitor")
        async with connected(live.ws, admin.access_token) as member:
            await member.subscribe("room:lobby")
        seen = {e["type"] for e in await watcher.events(2, timeout=10)}
        assert seen >= {"connection.established", "subscription.added"}, seen
    await http_publish(client, admin.headers, "room:lobby", data="archived")
    await wait_archived(servers, admin.org_id, 1)
    # The monitor events were published first; give their batch time to arrive anyway.
    await asyncio.sleep(1.0)
    rows = await archived_rows(servers, admin.org_id)
    assert [(r[0], r[5]) for r in rows] == [("room:lobby", "archived")]
    history = await http_history(client, admin.headers, "monitor")
    assert {"connection.established", "subscription.added"} <= {
        e["type"] for e in history["events"]
    }


async def test_another_tenant_never_sees_archived_events(
    client: httpx.AsyncClient, servers: Servers
) -> None:
    a, b = await new_org_admin(client), await new_org_admin(client)
    await publish_many(client, a, ["agents:shared-name"], 5)
    assert len(await wait_archived(servers, a.org_id, 5)) == 5
    assert await archived_rows(servers, b.org_id) == []


async def test_since_recovers_from_the_archive_once_the_stream_has_trimmed(
    client: httpx.AsyncClient, live: LiveServer, servers: Servers
) -> None:
    admin = await new_org_admin(client)
    channel = "agents:long-run"
    published = [e for _, e in await publish_many(client, admin, [channel], MAX_LEN + 60)]
    assert len(await wait_archived(servers, admin.org_id, MAX_LEN + 60)) == MAX_LEN + 60
    last = await http_publish(client, admin.headers, channel, data=MAX_LEN + 60)
    published.append(last)
    redis = Redis.from_url(servers.redis_url)
    try:
        stream = f"{channel_prefix(admin.org_id, channel)}:s"
        # Archived events are trimmed, back to MAX_LEN once over by more than 1/128.
        assert MAX_LEN <= await redis.xlen(stream) <= MAX_LEN + MAX_LEN // 128
    finally:
        await redis.aclose()
    # Event 3's position is long gone from Redis: the archive fills the gap, in order.
    since = {"offset": published[2]["offset"], "epoch": published[2]["epoch"]}
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(channel, since=since)
        assert (added["recovered"], added["replayed"]) == (True, len(published) - 3)
        replay = await raw.events(len(published) - 3, timeout=10)
        assert [e["data"] for e in replay] == list(range(3, MAX_LEN + 61))
        assert [e["offset"] for e in replay] == [e["offset"] for e in published[3:]]
        assert {e["epoch"] for e in replay} == {published[0]["epoch"]}
        after = await http_publish(client, admin.headers, channel, data="live")
        (live_event,) = await raw.events(1)
        assert (live_event["offset"], live_event["data"]) == (after["offset"], "live")
    # History pages through the archive too.
    page = await http_history(
        client, admin.headers, channel, since=published[2]["offset"], limit=50
    )
    assert [e["data"] for e in page["events"]] == list(range(3, 53))
    # Another epoch is another life of the channel: nothing to recover.
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(channel, since={**since, "epoch": "another-life"})
        assert (added["recovered"], added["replayed"]) == (False, 0)


async def test_trimming_waits_for_the_archiver(servers: Servers) -> None:
    """With no archiver running, nothing unarchived leaves the stream, and status says so."""
    app = create_app(make_settings(servers))  # the default test settings: no archiver
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://apix.test") as client:
            admin = await new_org_admin(client)
            channel = "agents:unarchived"
            await publish_many(client, admin, [channel], MAX_LEN + 20)
            redis = Redis.from_url(servers.redis_url)
            try:
                stream = f"{channel_prefix(admin.org_id, channel)}:s"
                assert await redis.xlen(stream) == MAX_LEN + 20
            finally:
                await redis.aclose()
            archive = (await client.get("/api/v1/status")).json()["archive"]
            assert archive["events_behind"] >= MAX_LEN + 20
            assert archive["oldest_pending_age_s"] is not None
            assert archive["archivers"] == 0
            history = await http_history(client, admin.headers, channel, limit=1000)
            assert len(history["events"]) == 1000
    assert await archived_rows(servers, admin.org_id) == []


# --- fault injection: an archiver killed mid-batch ---------------------------------------


@pytest.fixture
async def quiet_node(servers: Servers) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(make_settings(servers))  # publishes; archives nothing itself
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://apix.test") as client:
            yield client


def start_worker(servers: Servers, name: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "APIX_ENV": "test",
        "APIX_DATABASE_URL": servers.database_url,
        "APIX_REDIS_URL": servers.redis_url,
        "APIX_DATA_DIR": str(servers.data_dir),
        "APIX_DATABASE__MIGRATE_ON_START": "false",
        "APIX_WORKER__LEASE_MS": "1500",
        "APIX_WORKER__ARCHIVE_BATCH": "25",
        "APIX_LOG__FORMAT": "json",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "apix", "worker", "--consumer", name],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def pending(redis: Redis) -> int:
    total = 0
    for p in range(PARTITIONS):
        if await redis.exists(archive_key(p)):
            groups = await redis.xinfo_groups(archive_key(p))
            total += sum(int(g["pending"]) for g in groups)
    return total


@pytest.mark.timeout(120)
async def test_an_archiver_killed_mid_batch_loses_and_duplicates_nothing(
    quiet_node: httpx.AsyncClient, servers: Servers, owner_engine: AsyncEngine
) -> None:
    client = quiet_node
    admin = await new_org_admin(client)
    channels = [f"agents:run-{n}" for n in range(20)]
    redis = Redis.from_url(servers.redis_url)
    first = second = None
    try:
        first = start_worker(servers, "doomed")
        deadline = time.monotonic() + 30
        while await redis.zscore("apix:archive:workers", "doomed") is None:
            assert time.monotonic() < deadline, "the first archiver never started"
            await asyncio.sleep(0.05)
        async with owner_engine.connect() as blocker:
            # Writes wait behind this lock: the first archiver reads a batch and hangs
            # mid-write, holding entries it will never acknowledge.
            await blocker.execute(text("BEGIN"))
            await blocker.execute(text("LOCK TABLE apix_event IN EXCLUSIVE MODE"))
            published = await publish_many(client, admin, channels, 2000)
            deadline = time.monotonic() + 30
            while await pending(redis) == 0:
                assert time.monotonic() < deadline, "the first archiver never read a batch"
                await asyncio.sleep(0.05)
            first.send_signal(signal.SIGKILL)
            first.wait(10)
            stranded = await pending(redis)
            await blocker.execute(text("ROLLBACK"))
        assert stranded > 0
        second = start_worker(servers, "survivor")
        rows = await wait_archived(servers, admin.org_id, len(published), timeout=60)
        keys = [(r[0], r[2]) for r in rows]
        assert len(keys) == len(set(keys)) == len(published), "lost or duplicated"
        assert set(keys) == {(channel, e["offset"]) for channel, e in published}
        deadline = time.monotonic() + 15
        while (
            await pending(redis)
            or (await client.get("/api/v1/status")).json()["archive"]["events_behind"]
        ):
            assert time.monotonic() < deadline, "the survivor left entries behind"
            await asyncio.sleep(0.1)
        # A crash after the write but before the acknowledgement queues entries again:
        # writing them twice changes nothing.
        channel = channels[0]
        queue = archive_key(partition_of(admin.org_id, channel))
        stream = f"{channel_prefix(admin.org_id, channel)}:s"
        for entry_id, entry in await redis.xrange(stream, count=10):
            await redis.xadd(
                queue,
                {
                    "t": admin.org_id,
                    "c": channel,
                    "e": published[0][1]["epoch"],
                    "o": entry_id,
                    "d": entry[b"d"],
                },
            )
        deadline = time.monotonic() + 15
        while await redis.xlen(queue):
            assert time.monotonic() < deadline, "re-queued entries were not handled"
            await asyncio.sleep(0.1)
        assert len(await archived_rows(servers, admin.org_id)) == len(published)
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(10)
        await redis.aclose()

"""The publish script's trimming: by length and by age, never past what the archive holds."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from apix.config import RedisSettings
from apix.infra.redis import create_redis
from apix.realtime.broker import Broker, offset_key
from apix.realtime.channels import NAMESPACES, ChannelRef
from tests.conftest import Servers


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[Redis]:
    client = create_redis(servers.redis_url, RedisSettings())
    yield client
    await client.aclose()


def _channel(*, max_len: int = 1000, max_age_s: int = 3600) -> ChannelRef:
    namespace = dataclasses.replace(NAMESPACES["room"], max_len=max_len, max_age_s=max_age_s)
    return ChannelRef(f"room:{uuid.uuid4().hex[:8]}", namespace, None, str(uuid.uuid4()))


async def test_events_older_than_the_age_limit_are_trimmed(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_age_s=1)
    old = [await broker.publish(channel, "t", {"n": n}) for n in range(5)]
    snapshot = await broker.read(channel, after="0-0")
    assert [e.offset for e in snapshot.events] == [p.offset for p in old]
    assert snapshot.trimmed is None
    await asyncio.sleep(1.2)
    new = await broker.publish(channel, "t", {"n": 5})
    snapshot = await broker.read(channel, after="0-0")
    # Only the new event is left, and the position says where the gap ends.
    assert [e.offset for e in snapshot.events] == [new.offset]
    assert snapshot.trimmed == old[-1].offset
    assert not snapshot.covers("0-0", None)
    assert snapshot.covers(old[-1].offset, None)


async def test_young_events_stay_however_many_publishes_come(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_len=50)
    published = [await broker.publish(channel, "t", {"n": n}) for n in range(120)]
    snapshot = await broker.read(channel, after="0-0")
    kept = [e.offset for e in snapshot.events]
    assert kept == [p.offset for p in published[-50:]]
    assert snapshot.trimmed is not None
    assert offset_key(snapshot.trimmed) < offset_key(kept[0])


async def test_age_trimming_waits_for_the_archive(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True)
    channel = _channel(max_age_s=1)
    old = [await broker.publish(channel, "t", {"n": n}) for n in range(3)]
    await asyncio.sleep(1.2)
    await broker.publish(channel, "t", {"n": 3})
    snapshot = await broker.read(channel, after="0-0")
    assert len(snapshot.events) == 4  # nothing archived yet: nothing trimmed
    assert snapshot.trimmed is None
    await broker.mark_archived([(channel.meta_key, old[0].epoch, old[1].offset)])
    await broker.publish(channel, "t", {"n": 4})
    snapshot = await broker.read(channel, after="0-0")
    assert snapshot.trimmed == old[1].offset
    assert snapshot.events[0].offset == old[2].offset

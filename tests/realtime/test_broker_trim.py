"""The publish script's trimming: by length and by age, never past what the archive holds."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from apix.realtime.broker import Broker, offset_key
from apix.realtime.channels import NAMESPACES, ChannelRef


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


async def test_length_trimming_waits_for_the_archive_and_then_catches_up(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True)
    channel = _channel(max_len=3)
    published = [await broker.publish(channel, "t", {"n": n}) for n in range(8)]
    snapshot = await broker.read(channel, after="0-0")
    assert [e.offset for e in snapshot.events] == [p.offset for p in published]  # none held
    # The archive holds the first five: the next publish trims them, and no further.
    await broker.mark_archived([(channel.meta_key, published[0].epoch, published[4].offset)])
    last = await broker.publish(channel, "t", {"n": 8})
    snapshot = await broker.read(channel, after="0-0")
    assert snapshot.trimmed == published[4].offset
    assert [e.offset for e in snapshot.events] == [p.offset for p in published[5:]] + [last.offset]
    # Once it holds everything, the stream is back to its last three.
    await broker.mark_archived([(channel.meta_key, published[0].epoch, last.offset)])
    newest = await broker.publish(channel, "t", {"n": 9})
    snapshot = await broker.read(channel, after="0-0")
    assert [e.offset for e in snapshot.events] == [
        published[7].offset,
        last.offset,
        newest.offset,
    ]


async def test_an_old_archive_mark_does_not_hold_back_a_node_that_does_not_archive(
    redis: Redis,
) -> None:
    """With archiving switched off (`APIX_WORKER__ARCHIVE=false`), the mark the archiver
    left in a channel's metadata no longer limits trimming: the stream keeps its length."""
    archiving = Broker(redis, source="test", archive=True)
    channel = _channel(max_len=3)
    first = [await archiving.publish(channel, "t", {"n": n}) for n in range(2)]
    await archiving.mark_archived([(channel.meta_key, first[0].epoch, first[0].offset)])
    not_archiving = Broker(redis, source="test", archive=False)
    later = [await not_archiving.publish(channel, "t", {"n": n}) for n in range(2, 8)]
    snapshot = await not_archiving.read(channel, after="0-0")
    assert [e.offset for e in snapshot.events] == [p.offset for p in later[-3:]]
    assert snapshot.trimmed == later[-4].offset


async def test_monitor_trims_by_length_without_waiting_for_the_archive(redis: Redis) -> None:
    """`monitor` is not archived: even on a node that archives, its stream keeps its last
    `max_len` events at once, and nothing of it is queued for the archiver."""
    broker = Broker(redis, source="test", archive=True)
    namespace = dataclasses.replace(NAMESPACES["monitor"], max_len=3)
    monitor = ChannelRef("monitor", namespace, None, str(uuid.uuid4()))
    published = [await broker.publish(monitor, "t", {"n": n}) for n in range(6)]
    snapshot = await broker.read(monitor, after="0-0")
    assert [e.offset for e in snapshot.events] == [p.offset for p in published[3:]]
    assert snapshot.trimmed == published[2].offset
    assert snapshot.archived is None
    queued = await redis.xrange(monitor.archive_key)
    assert not [
        e for _, e in queued if e[b"c"] == b"monitor" and e[b"t"] == monitor.tenant.encode()
    ]


async def test_a_publish_stays_cheap_however_far_the_archive_lags(redis: Redis) -> None:
    """The cut is looked for only among archived events: 30,000 unarchived events over the
    length limit must not be read on every publish (they were: ~5 ms of Redis per publish)."""
    broker = Broker(redis, source="test", archive=True)
    channel = _channel(max_len=10)
    first = await broker.publish(channel, "t", {})
    await broker.mark_archived([(channel.meta_key, first.epoch, first.offset)])
    async with redis.pipeline(transaction=False) as pipe:
        for _ in range(30_000):
            pipe.xadd(channel.stream_key, {"d": "{}"})
        await pipe.execute()
    started = time.perf_counter()
    for _ in range(100):
        await broker.publish(channel, "t", {})
    elapsed = time.perf_counter() - started
    assert await redis.xlen(channel.stream_key) == 30_100  # only the archived one went
    assert elapsed < 0.25, f"100 publishes took {elapsed:.3f} s"


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_len=st.integers(1, 400),
    batches=st.lists(st.integers(1, 300), min_size=1, max_size=5),
)
async def test_a_stream_keeps_its_last_max_len_events_and_at_most_1_128_more(
    redis: Redis, max_len: int, batches: list[int]
) -> None:
    """Cut back to `max_len` in batches: never fewer than the last `max_len`, never more than
    1/128 over, and `trimmed` is always the event just before the first one kept, so a
    position is recovered exactly when everything after it is still there."""
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_len=max_len)
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel.pubsub_channel)
    await pubsub.get_message(timeout=1.0)  # the confirmation
    offsets: list[str] = []  # of every event, from the announcements
    sent = 0
    try:
        for size in batches:
            sent += size
            if size == 1:
                await broker.publish(channel, "t", {})
            else:
                broker.publish_many_nowait(channel, [("t", {})] * size)
            while len(offsets) < sent:
                message = await pubsub.get_message(timeout=2.0)
                assert message is not None, "an announcement is missing"
                if message["type"] == "message":
                    offsets.append(message["data"].split(b" ")[2].decode())
            snapshot = await broker.read(channel, after="0-0")
            kept = [e.offset for e in snapshot.events]
            assert min(len(offsets), max_len) <= len(kept) <= max_len + max_len // 128
            assert kept == offsets[-len(kept) :]
            if len(kept) == len(offsets):
                assert snapshot.trimmed is None
            else:
                assert snapshot.trimmed == offsets[-len(kept) - 1]
                assert snapshot.covers(snapshot.trimmed, None)
                assert not snapshot.covers(offsets[0], None) or len(kept) == len(offsets) - 1
    finally:
        await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]


async def test_a_channel_at_its_limit_is_cut_back_once_every_max_len_128_publishes(
    redis: Redis,
) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_len=256)  # cut once over by more than 2
    lengths = []
    for _ in range(300):
        await broker.publish(channel, "t", {})
        lengths.append(await redis.xlen(channel.stream_key))
    assert lengths[:256] == list(range(1, 257))
    # 257, 258, then the publish that would make 259 cuts back to 256: one cut in three.
    assert lengths[256:] == [257, 258, 256] * 14 + [257, 258]


async def test_the_keys_live_for_their_time_to_live_after_a_publish(redis: Redis) -> None:
    """A publish keeps the stream and its metadata for (about) the namespace's age limit plus
    a day; the time to live is renewed once a sixty-fourth of it has passed."""
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_age_s=3600)
    ttl_ms = (3600 + 24 * 3600) * 1000
    await broker.publish(channel, "t", {})
    for key in (channel.stream_key, channel.meta_key):
        assert ttl_ms * 63 // 64 < await redis.pttl(key) <= ttl_ms
    # As if an hour had passed since the last renewal: both keys are down to less than a
    # sixty-fourth short of it, and the next publish renews them.
    renewed = int(await redis.hget(channel.meta_key, "ttl") or 0)
    await redis.hset(channel.meta_key, "ttl", renewed - 3_600_000)
    for key in (channel.stream_key, channel.meta_key):
        await redis.pexpire(key, ttl_ms - 3_600_000)
    await broker.publish(channel, "t", {})
    for key in (channel.stream_key, channel.meta_key):
        assert ttl_ms * 63 // 64 < await redis.pttl(key) <= ttl_ms

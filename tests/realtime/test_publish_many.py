"""Several events published by one script run: stored, trimmed, announced, archived and
counted exactly as one publish each would."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from apix.core.json import loads
from apix.realtime.broker import Broker, offset_key
from apix.realtime.channels import NAMESPACES, ChannelRef


def _channel(namespace: str = "monitor", *, max_len: int = 1000) -> ChannelRef:
    ns = dataclasses.replace(NAMESPACES[namespace], max_len=max_len)
    name = namespace if namespace == "monitor" else f"{namespace}:x"
    return ChannelRef(name, ns, None, str(uuid.uuid4()))


async def _settled(broker: Broker) -> None:
    await broker.batch.call("PING")  # the node's round trips go in order


async def test_events_are_stored_and_announced_in_order(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel()
    pubsub = redis.pubsub()
    await pubsub.subscribe(channel.pubsub_channel)
    await pubsub.get_message(timeout=1.0)  # the confirmation
    events = [(f"t.{n}", {"n": n}) for n in range(5)]
    broker.publish_many_nowait(channel, events)
    await _settled(broker)

    snapshot = await broker.read(channel, after="0-0")
    assert [(e.type, loads(e.payload)["data"]) for e in snapshot.events] == events
    offsets = [e.offset for e in snapshot.events]
    assert offsets == sorted(offsets, key=offset_key)
    assert len(set(offsets)) == 5
    announced = []
    while len(announced) < 5:
        message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        assert message is not None, "an announcement is missing"
        announced.append(message["data"].split(b" ", 4))
    assert [a[2].decode() for a in announced] == offsets
    assert {a[1].decode() for a in announced} == {snapshot.epoch}
    assert [a[3].decode() for a in announced] == [t for t, _ in events]
    await pubsub.aclose()


async def test_archived_and_counted_like_single_publishes(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True, count=True)
    await broker.take_counts()
    channel = _channel("room")
    broker.publish_many_nowait(channel, [("a", {}), ("b", {}), ("c", {})])
    await _settled(broker)
    snapshot = await broker.read(channel, after="0-0")
    archived = await redis.xrange(channel.archive_key)
    mine = [e for _, e in archived if e[b"c"] == channel.name.encode()]
    assert [e[b"o"].decode() for e in mine] == [e.offset for e in snapshot.events]
    assert (await broker.take_counts())[(channel.tenant, channel.name)] == 3


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(max_len=st.integers(1, 6), batches=st.lists(st.integers(1, 8), min_size=1, max_size=4))
async def test_trimming_keeps_the_last_max_len_events(
    redis: Redis, max_len: int, batches: list[int]
) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_len=max_len)
    sent = 0
    for size in batches:
        broker.publish_many_nowait(channel, [("t", {"n": sent + i}) for i in range(size)])
        sent += size
    await _settled(broker)
    snapshot = await broker.read(channel, after="0-0")
    kept = [loads(e.payload)["data"]["n"] for e in snapshot.events]
    assert kept == list(range(sent))[-max_len:]
    assert (snapshot.trimmed is not None) == (sent > max_len)


async def test_monitor_events_of_one_loop_turn_are_all_stored_in_order(app: Any) -> None:
    """A connect storm's turn: more `monitor` events than one script run takes, for two
    organisations; every one is stored on its own channel, in order."""
    gateway = app.state.gateway
    first, second = _channel(), _channel()
    for n in range(250):
        gateway.monitor_event(first, "connection.established", {"n": n})
        if n % 2:
            gateway.monitor_event(second, "subscription.added", {"n": n})
    await asyncio.sleep(0)  # the end of the turn
    await _settled(gateway.broker)
    for channel, expected in ((first, range(250)), (second, range(1, 250, 2))):
        snapshot = await gateway.broker.read(channel, after="0-0")
        assert [loads(e.payload)["data"]["n"] for e in snapshot.events] == list(expected)

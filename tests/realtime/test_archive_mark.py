"""The archiver's marks: per channel and epoch, how far the archive holds the stream, sent
with the node's shared round trips (by SHA, no `SCRIPT EXISTS` before each batch)."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from apix.realtime.broker import Broker, Published
from apix.realtime.channels import NAMESPACES, ChannelRef


def _channel() -> ChannelRef:
    namespace = dataclasses.replace(NAMESPACES["room"], max_len=1000, max_age_s=3600)
    return ChannelRef(f"room:{uuid.uuid4().hex[:8]}", namespace, None, str(uuid.uuid4()))


async def _archived(broker: Broker, channel: ChannelRef) -> str | None:
    return (await broker.read(channel)).archived


async def test_marks_for_many_channels_land_in_one_call(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True)
    # More channels than one shared round trip carries (512 commands).
    channels = [_channel() for _ in range(600)]
    published = await asyncio.gather(*(broker.publish(c, "t", {}) for c in channels))
    await broker.mark_archived(
        [(c.meta_key, p.epoch, p.offset) for c, p in zip(channels, published, strict=True)]
    )
    marks = await asyncio.gather(*(_archived(broker, c) for c in channels))
    assert marks == [p.offset for p in published]
    await broker.mark_archived([])  # nothing to mark: nothing to do


async def test_a_mark_never_moves_back_nor_crosses_an_epoch(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True)
    channel = _channel()
    events: list[Published] = [await broker.publish(channel, "t", {"n": n}) for n in range(3)]
    epoch = events[0].epoch
    await broker.mark_archived([(channel.meta_key, epoch, events[2].offset)])
    await broker.mark_archived([(channel.meta_key, epoch, events[1].offset)])  # late, older
    assert await _archived(broker, channel) == events[2].offset
    # A mark for an epoch the channel no longer has (its stream was lost) is ignored.
    other = _channel()
    first = await broker.publish(other, "t", {})
    await broker.mark_archived([(other.meta_key, "an-old-epoch", first.offset)])
    assert await _archived(broker, other) is None


async def test_one_failing_mark_does_not_keep_the_others_back(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True)
    before, after = _channel(), _channel()
    one = await broker.publish(before, "t", {})
    two = await broker.publish(after, "t", {})
    broken = f"apix:test:{uuid.uuid4().hex}"
    await redis.set(broken, "not a hash")
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await broker.mark_archived(
            [
                (before.meta_key, one.epoch, one.offset),
                (broken, one.epoch, one.offset),
                (after.meta_key, two.epoch, two.offset),
            ]
        )
    assert await _archived(broker, before) == one.offset
    assert await _archived(broker, after) == two.offset


async def test_marking_asks_redis_nothing_but_the_script_runs(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=True)
    channels = [_channel() for _ in range(3)]
    published = [await broker.publish(c, "t", {}) for c in channels]
    db = redis.get_connection_kwargs()["db"]
    sentinel = f"end-of-marks-{uuid.uuid4().hex}"
    seen: list[str] = []
    async with redis.monitor() as monitor:
        for _ in range(2):  # the second batch too: nothing is checked before it either
            await broker.mark_archived(
                [(c.meta_key, p.epoch, p.offset) for c, p in zip(channels, published, strict=True)]
            )
        await redis.echo(sentinel)
        async with asyncio.timeout(10):
            while True:
                command = await monitor.next_command()
                if command["db"] != db or command["client_type"] == "lua":
                    continue
                if sentinel in command["command"]:
                    break
                seen.append(command["command"].split(" ", 1)[0].upper())
    # One EVALSHA per mark and no SCRIPT EXISTS before them (a new pooled connection may
    # SELECT its db first: that is not a question about the script). The node's pipeline
    # loads the script once, ahead of its first run, and never again.
    assert [c for c in seen if c in {"EVALSHA", "EVAL", "SCRIPT"}] == ["SCRIPT"] + ["EVALSHA"] * 6

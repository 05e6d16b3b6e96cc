"""Publishes to one channel that wait for the same Redis batch run as one script: each caller
still gets its own event's offset, the events are stored and announced in the order they were
published, and a failure reaches every caller the run carried."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from apix.core.json import loads
from apix.infra.redis import AutoPipeline
from apix.realtime.broker import Broker, offset_key
from apix.realtime.channels import NAMESPACES, ChannelRef


def _channel(*, max_len: int = 1000) -> ChannelRef:
    namespace = dataclasses.replace(NAMESPACES["room"], max_len=max_len)
    return ChannelRef(f"room:{uuid.uuid4().hex[:8]}", namespace, None, str(uuid.uuid4()))


class CountingPipeline(AutoPipeline):
    """Counts the script runs it queues, by SHA."""

    def __init__(self, redis: Redis) -> None:
        super().__init__(redis)
        self.runs: Counter[str] = Counter()

    def evalsha(self, script: Any, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        self.runs[script.sha] += 1
        return super().evalsha(script, keys, args)


def _counted(redis: Redis, *, archive: bool = False) -> tuple[Broker, Counter[str], str]:
    """A broker, the script runs its pipeline queued, and the SHA of the gathered script."""
    batch = CountingPipeline(redis)
    broker = Broker(redis, source="test", archive=archive, batch=batch)
    return broker, batch.runs, broker._publish_many.sha


async def test_publishes_of_one_turn_are_one_script_run_with_their_own_offsets(
    redis: Redis,
) -> None:
    broker, runs, sha = _counted(redis)
    channel = _channel()
    await broker.publish(channel, "warm", {})  # the script is loaded; the channel exists
    runs.clear()
    published = await asyncio.gather(
        *(broker.publish(channel, f"t.{n}", {"n": n}) for n in range(30))
    )
    assert runs == {sha: 1}

    offsets = [p.offset for p in published]
    assert offsets == sorted(offsets, key=offset_key)  # in the order published
    assert len(set(offsets)) == 30
    assert len({p.epoch for p in published}) == 1
    assert len({p.id for p in published}) == 30
    assert not any(p.duplicate for p in published)

    snapshot = await broker.read(channel, after=published[0].offset, limit=100)
    assert [e.offset for e in snapshot.events] == offsets[1:]
    stored = {e.offset: loads(e.payload) for e in snapshot.events}
    for n, p in enumerate(published[1:], start=1):  # each caller's offset is its own event
        event = stored[p.offset]
        assert (event["id"], event["type"], event["data"]) == (p.id, f"t.{n}", {"n": n})


async def test_a_run_takes_at_most_256_publishes_and_the_rest_follow_in_order(
    redis: Redis,
) -> None:
    broker, runs, sha = _counted(redis)
    channel = _channel()
    await broker.publish(channel, "warm", {})
    runs.clear()
    published = await asyncio.gather(*(broker.publish(channel, "t", {"n": n}) for n in range(600)))
    assert runs == {sha: 3}  # 256, 256 and 88
    offsets = [p.offset for p in published]
    assert offsets == sorted(offsets, key=offset_key)
    snapshot = await broker.read(channel, after=published[0].offset, limit=1000)
    assert [loads(e.payload)["data"]["n"] for e in snapshot.events] == list(range(1, 600))


async def test_publishes_to_different_channels_are_runs_of_their_own(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    first, second = _channel(), _channel()
    published = await asyncio.gather(
        *(broker.publish(c, "t", {"n": n}) for n in range(5) for c in (first, second))
    )
    for channel in (first, second):
        mine = published[(channel is second) :: 2]
        snapshot = await broker.read(channel, after="0-0")
        assert [e.offset for e in snapshot.events] == [p.offset for p in mine]
        assert [loads(e.payload)["data"]["n"] for e in snapshot.events] == list(range(5))


async def test_a_failed_run_fails_every_publish_it_carried_and_no_other(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    broken, fine = _channel(), _channel()
    await redis.set(broken.meta_key, "not a hash")  # the script's HMGET fails: WRONGTYPE
    outcomes = await asyncio.gather(
        *(broker.publish(broken, "t", {"n": n}) for n in range(3)),
        broker.publish(fine, "t", {}),
        return_exceptions=True,
    )
    assert all(isinstance(o, ResponseError) for o in outcomes[:3]), outcomes
    assert not isinstance(outcomes[3], BaseException), outcomes[3]
    assert (await broker.read(fine, after="0-0")).events[0].offset == outcomes[3].offset


async def test_publishes_go_on_after_redis_forgets_the_script(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel()
    await broker.publish(channel, "before", {})
    await redis.script_flush()  # as after a restart without persistence
    published = await asyncio.gather(
        *(broker.publish(channel, "after", {"n": n}) for n in range(4))
    )
    snapshot = await broker.read(channel, after="0-0")
    assert [e.offset for e in snapshot.events][1:] == [p.offset for p in published]
    assert [loads(e.payload)["data"]["n"] for e in snapshot.events[1:]] == [0, 1, 2, 3]


async def test_a_caller_that_goes_away_leaves_the_others_their_results(redis: Redis) -> None:
    broker = Broker(redis, source="test", archive=False)
    channel = _channel()
    await broker.publish(channel, "warm", {})
    leaving = asyncio.ensure_future(broker.publish(channel, "t", {"n": 0}))
    staying = asyncio.ensure_future(broker.publish(channel, "t", {"n": 1}))
    await asyncio.sleep(0)  # both joined the batch
    leaving.cancel()
    result = await staying
    with pytest.raises(asyncio.CancelledError):
        await leaving
    snapshot = await broker.read(channel, after="0-0")
    # The event of the caller that left was published all the same, before the other.
    assert [loads(e.payload)["data"].get("n") for e in snapshot.events] == [None, 0, 1]
    assert snapshot.events[-1].offset == result.offset


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(max_len=st.integers(1, 6), turns=st.lists(st.integers(1, 8), min_size=1, max_size=4))
async def test_gathered_publishes_keep_the_last_max_len_events(
    redis: Redis, max_len: int, turns: list[int]
) -> None:
    """Trimming with any number of publishes per run keeps what one publish at a time
    would keep: the channel's last ``max_len`` events, in order."""
    broker = Broker(redis, source="test", archive=False)
    channel = _channel(max_len=max_len)
    sent = 0
    for size in turns:
        await asyncio.gather(*(broker.publish(channel, "t", {"n": sent + i}) for i in range(size)))
        sent += size
    snapshot = await broker.read(channel, after="0-0")
    assert [loads(e.payload)["data"]["n"] for e in snapshot.events] == list(range(sent))[-max_len:]
    assert (snapshot.trimmed is not None) == (sent > max_len)


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    max_len=st.integers(1, 8),
    steps=st.lists(st.tuples(st.integers(1, 8), st.booleans()), min_size=1, max_size=5),
)
async def test_gathered_publishes_leave_a_channel_as_single_publishes_do(
    redis: Redis, max_len: int, steps: list[tuple[int, bool]]
) -> None:
    """With the archive on, trimming waits for the archiver's mark: a turn's publishes run
    as one script keep and trim exactly what the same publishes one at a time do (an
    idempotency key makes each a script run of its own)."""
    broker = Broker(redis, source="test", archive=True)
    gathered, single = _channel(max_len=max_len), _channel(max_len=max_len)
    sent = 0
    for size, archived in steps:
        together = await asyncio.gather(
            *(broker.publish(gathered, "t", {"n": sent + i}) for i in range(size))
        )
        alone = [
            await broker.publish(single, "t", {"n": sent + i}, idempotency_key=uuid.uuid4().hex)
            for i in range(size)
        ]
        sent += size
        if archived:  # the archiver caught up with the newest event
            await broker.mark_archived(
                [
                    (gathered.meta_key, together[-1].epoch, together[-1].offset),
                    (single.meta_key, alone[-1].epoch, alone[-1].offset),
                ]
            )
    kept = []
    for channel in (gathered, single):
        snapshot = await broker.read(channel, after="0-0")
        kept.append(
            ([loads(e.payload)["data"]["n"] for e in snapshot.events], snapshot.trimmed is None)
        )
    assert kept[0] == kept[1]

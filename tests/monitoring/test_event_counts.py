"""Published events are counted by the publish script itself, and taken exactly once."""

from __future__ import annotations

import asyncio
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from apix.realtime.broker import Broker
from apix.realtime.channels import NAMESPACES, PARTITIONS, ChannelRef, counter_key


def _channel(tenant: str, name: str) -> ChannelRef:
    return ChannelRef(name, NAMESPACES["room"], None, tenant)


async def _empty(redis: Redis) -> None:
    await redis.delete(*(counter_key(p) for p in range(PARTITIONS)))


async def test_each_publish_is_counted_once_per_channel_and_taken_once(redis: Redis) -> None:
    await _empty(redis)
    tenant = str(uuid.uuid4())
    counting = Broker(redis, source="test", archive=False, count=True)
    quiet = Broker(redis, source="test", archive=False)  # monitoring off: not counted
    a, b = _channel(tenant, "room:a"), _channel(tenant, "room:b")
    for _ in range(3):
        await counting.publish(a, "t", {})
    await counting.publish(b, "t", {})
    await quiet.publish(a, "t", {})
    # A retried publish is not a new event.
    await counting.publish(b, "t", {}, idempotency_key="k")
    await counting.publish(b, "t", {}, idempotency_key="k")

    assert await counting.take_counts() == {(tenant, "room:a"): 3, (tenant, "room:b"): 2}
    assert await counting.take_counts() == {}


@settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    rounds=st.lists(
        st.dictionaries(st.sampled_from(["room:a", "room:b", "room:c"]), st.integers(1, 5)),
        min_size=1,
        max_size=4,
    )
)
async def test_concurrent_takers_never_count_an_event_twice(
    redis: Redis, rounds: list[dict[str, int]]
) -> None:
    """Two nodes taking while events arrive (a lease handed over mid-take): between them
    every event is counted exactly once."""
    await _empty(redis)
    tenant = str(uuid.uuid4())
    broker = Broker(redis, source="test", archive=False, count=True)
    taken: list[dict[tuple[str, str], int]] = []
    expected: dict[tuple[str, str], int] = {}
    for publishes in rounds:
        sends = [
            broker.publish(_channel(tenant, name), "t", {})
            for name, n in publishes.items()
            for _ in range(n)
        ]
        for name, n in publishes.items():
            expected[(tenant, name)] = expected.get((tenant, name), 0) + n
        results = await asyncio.gather(broker.take_counts(), *sends, broker.take_counts())
        taken += [results[0], results[-1]]
    taken.append(await broker.take_counts())
    total: dict[tuple[str, str], int] = {}
    for counts in taken:
        for key, n in counts.items():
            total[key] = total.get(key, 0) + n
    assert total == expected

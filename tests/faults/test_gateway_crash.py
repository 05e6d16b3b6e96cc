"""Fault scenario 1: one of two gateway nodes is killed (``kill -9``) mid-stream.

Two `apix serve` processes share PostgreSQL and Redis. ``ack: true`` subscribers, half on
each node, follow a set of channels; a publisher sends events over the HTTP API to both
nodes, retrying a failed publish on the other node with the same idempotency key. Partway
through, one node is killed: its clients reconnect to the survivor with ``resume`` (the
session's subscriptions restart after their last acknowledged event) and must end with
every acknowledged event exactly once, in order, after the SDK's de-duplication by offset.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import pytest

from tests.conftest import Servers
from tests.faults.conftest import StartNodes, admin_on
from tests.faults.processes import Node
from tests.faults.traffic import (
    AckSubscriber,
    HttpPublisher,
    plan_events,
    report,
    tally,
    wait_caught_up,
)

pytestmark = pytest.mark.e2e

# Ten channels: 500 events each stay within what a `room` keeps for replay (1,000).
CHANNELS = [f"room:crash-{i}" for i in range(10)]
SUBSCRIBERS = 200
CHANNELS_PER_SUBSCRIBER = 2
EVENTS = 5000
KILL_AFTER = 2000  # acknowledged publishes


@pytest.fixture
def nodes(servers: Servers, start_nodes: StartNodes) -> list[Node]:
    return start_nodes(2, database_url=servers.database_url, redis_url=servers.redis_url)


@pytest.mark.timeout(180)
async def test_clients_of_a_killed_node_resume_on_the_survivor_with_nothing_lost(
    nodes: list[Node], record_summary: Any
) -> None:
    started = time.monotonic()
    a, b = nodes
    admin = await admin_on(a)
    urls = [a.ws, b.ws]
    subscribers = [
        AckSubscriber(
            urls,
            admin.access_token,
            [CHANNELS[(i + j * 5) % len(CHANNELS)] for j in range(CHANNELS_PER_SUBSCRIBER)],
            home=i % 2,
            ack_interval=0.2,
        )
        for i in range(SUBSCRIBERS)
    ]
    publisher = HttpPublisher([a.http, b.http], admin.headers, concurrency=8)
    try:
        for subscriber in subscribers:
            subscriber.start()
        await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in subscribers)), 60)
        connected_s = time.monotonic() - started
        on_a = [s for s in subscribers if s.node == a.name]
        assert len(on_a) == SUBSCRIBERS // 2

        publishing = asyncio.create_task(publisher.run(plan_events(EVENTS, CHANNELS)))
        await asyncio.wait_for(publisher.wait_acknowledged(KILL_AFTER), 60)
        await asyncio.to_thread(a.kill)
        killed_at = time.monotonic() - publisher.started
        await publishing
        streams = [(c, s) for sub in subscribers for c, s in sub.streams.items()]
        caught_up_s = await wait_caught_up(publisher.results, streams, 45)
    finally:
        for subscriber in subscribers:
            await subscriber.close()

    counts = tally(publisher.results, streams)
    reconnects = [t for s in on_a for t in s.stats.reconnect_s]
    summary = {
        "published": EVENTS,
        "acknowledged": publisher.acknowledged,
        "channels": len(CHANNELS),
        "subscribers": SUBSCRIBERS,
        "subscriptions": SUBSCRIBERS * CHANNELS_PER_SUBSCRIBER,
        "on_killed_node": len(on_a),
        **vars(counts),
        "resumed": sum(s.stats.resumed for s in on_a),
        "not_resumed": sum(s.stats.not_resumed for s in subscribers),
        "unrecovered": sum(s.stats.unrecovered for s in subscribers),
        "replayed_after_resume": sum(s.stats.replayed for s in on_a),
        "raw_duplicates_dropped": sum(st.raw_duplicates for _, st in streams),
        "redeliveries": sum(s.stats.redeliveries for s in subscribers),
        "reconnect_median_s": round(statistics.median(reconnects), 3) if reconnects else None,
        "reconnect_max_s": round(max(reconnects), 3) if reconnects else None,
        "publish_statuses": dict(publisher.statuses),
        "publish_retries": publisher.retried,
        "publish_retries_stored_already": publisher.duplicates,
        "killed_at_s": round(killed_at, 2),
        "publishing_s": round(publisher.finished - publisher.started, 2),
        "caught_up_after_publishing_s": round(caught_up_s, 2),
        "connect_s": round(connected_s, 2),
        "total_s": round(time.monotonic() - started, 2),
    }
    record_summary(report("gateway-kill", summary))

    assert publisher.acknowledged == EVENTS
    assert counts.clean, counts
    assert (
        counts.expected
        == counts.delivered
        == EVENTS * CHANNELS_PER_SUBSCRIBER * SUBSCRIBERS // len(CHANNELS)
    )
    assert [e for s in subscribers for e in s.errors] == []
    assert all(s.node == b.name for s in subscribers)
    assert all(s.stats.resumed >= 1 for s in on_a)
    assert summary["not_resumed"] == summary["unrecovered"] == 0

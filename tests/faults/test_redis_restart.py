"""Fault scenario 2: Redis dies (SIGKILL) mid-stream and is started again with its data.

Two `apix serve` nodes share the test's PostgreSQL and a Redis of this test's own, run with
``appendonly yes`` and ``appendfsync always``: every write it acknowledged is on disk
before the reply. A publisher sends over HTTP to both nodes and retries each event (same
idempotency key) until it gets 201. Subscribers on both nodes may see reconnects, but must
end with every acknowledged event exactly once, in order: WebSocket ones (the `apix.client`
SDK, and ``ack: true`` clients that resume their session), and Server-Sent Events ones
(reconnecting with ``Last-Event-ID`` as a browser does).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Servers
from tests.faults.conftest import StartNodes, admin_on
from tests.faults.processes import Node, RedisServer
from tests.faults.traffic import (
    AckSubscriber,
    HttpPublisher,
    SdkSubscriber,
    SseSubscriber,
    plan_events,
    report,
    tally,
    wait_caught_up,
)
from tests.identity.factories import Account

pytestmark = pytest.mark.e2e

CHANNELS = ["room:rd-a", "room:rd-b"]
EVENTS = 1000
RATE = 100.0  # events per second: the stream lasts ~10 s
DOWN_AT_S = 3.0
DOWN_FOR_S = 1.5
# What a node logs each time it fails to read its pub/sub connection (then it waits 0.5 s).
PUBSUB_RETRY = "hub: pub/sub read failed"


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nodes(servers: Servers, redis_server: RedisServer, start_nodes: StartNodes) -> list[Node]:
    return start_nodes(2, database_url=servers.database_url, redis_url=redis_server.url)


@dataclass
class Outage:
    acknowledged_before: int = 0
    down_s: float = 0.0
    publishing_s: float = 0.0


async def _retry_failed(node: Node, before: int, timeout_s: float = 5.0) -> None:
    """Wait until the node logs one more failed attempt to read its pub/sub connection."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if node.logged(PUBSUB_RETRY) > before:
            return
        await asyncio.sleep(0.005)


async def _stream_through_a_restart(
    publisher: HttpPublisher, redis_server: RedisServer, nodes: list[Node], admin: Account
) -> Outage:
    """Publish ``EVENTS`` at ``RATE``; kill Redis ``DOWN_AT_S`` in and start it again
    ``DOWN_FOR_S`` later, just after the nodes' pub/sub reconnect attempt failed; then
    publish at once: these events land before the nodes' pub/sub connections are back."""
    outage = Outage()
    publishing = asyncio.create_task(publisher.run(plan_events(EVENTS, CHANNELS), rate=RATE))
    await asyncio.sleep(DOWN_AT_S)
    outage.acknowledged_before = publisher.acknowledged
    await asyncio.to_thread(redis_server.kill)
    down_at = time.monotonic()
    await asyncio.sleep(DOWN_FOR_S)
    await _retry_failed(nodes[0], nodes[0].logged(PUBSUB_RETRY))
    await asyncio.to_thread(redis_server.start)
    outage.down_s = time.monotonic() - down_at
    extra = HttpPublisher([n.http for n in nodes], admin.headers, concurrency=len(nodes))
    await extra.run([(EVENTS + i, CHANNELS[i % len(CHANNELS)]) for i in range(2 * len(nodes))])
    publisher.results.update(extra.results)
    await publishing
    outage.publishing_s = publisher.finished - publisher.started
    return outage


@pytest.mark.timeout(120)
async def test_websocket_subscribers_lose_no_acknowledged_event_when_redis_restarts(
    nodes: list[Node], redis_server: RedisServer, record_summary: Any
) -> None:
    started = time.monotonic()
    a, b = nodes
    admin = await admin_on(a)
    urls = [a.ws, b.ws]
    sdk = [SdkSubscriber(urls[i % 2], admin.access_token, CHANNELS) for i in range(6)]
    acks = [AckSubscriber(urls, admin.access_token, CHANNELS, home=i % 2) for i in range(4)]
    for subscriber in sdk:
        await subscriber.start()
    for ack_subscriber in acks:
        ack_subscriber.start()
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in acks)), 15)
    publisher = HttpPublisher([a.http, b.http], admin.headers, concurrency=4)
    try:
        outage = await _stream_through_a_restart(publisher, redis_server, nodes, admin)
        streams = [(c, s) for sub in sdk for c, s in sub.streams.items()]
        streams += [(c, s) for sub in acks for c, s in sub.streams.items()]
        caught_up_s = await wait_caught_up(publisher.results, streams, 20)
    finally:
        for subscriber in sdk:
            await subscriber.close()
        for ack_subscriber in acks:
            await ack_subscriber.close()

    counts = tally(publisher.results, streams)
    reconnects = [t for s in acks for t in s.stats.reconnect_s]
    summary = {
        "published": len(publisher.results),
        "acknowledged_before_kill": outage.acknowledged_before,
        "subscribers": len(sdk) + len(acks),
        **vars(counts),
        "redis_down_s": round(outage.down_s, 2),
        "publish_statuses": dict(publisher.statuses),
        "sdk_reconnects": sum(s.reconnects for s in sdk),
        "ack_resumed": sum(s.stats.resumed for s in acks),
        "ack_unrecovered": sum(s.stats.unrecovered for s in acks),
        "ack_connects_refused_while_down": sum(s.stats.refused for s in acks),
        "ack_reconnect_max_s": round(max(reconnects, default=0.0), 2),
        "publishing_s": round(outage.publishing_s, 2),
        "caught_up_after_publishing_s": round(caught_up_s, 2),
        "total_s": round(time.monotonic() - started, 2),
    }
    record_summary(report("redis-restart", summary))

    assert all(node.process.poll() is None for node in nodes)
    assert len(publisher.results) == EVENTS + 2 * len(nodes)  # each got its 201 in the end
    assert set(publisher.statuses) <= {"201", "503"}  # Redis down: 503, never 500
    assert counts.clean, counts
    assert counts.expected == counts.delivered
    assert [e for s in acks for e in s.errors] == []
    assert all(s.reconnects >= 1 for s in sdk)  # sent away to resume, not left with a gap


@pytest.mark.timeout(120)
async def test_sse_subscribers_lose_no_acknowledged_event_when_redis_restarts(
    nodes: list[Node], redis_server: RedisServer, record_summary: Any
) -> None:
    admin = await admin_on(nodes[0])
    sses = [SseSubscriber(n.http, admin.access_token, c) for n in nodes for c in CHANNELS]
    for sse in sses:
        sse.start()
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in sses)), 15)
    publisher = HttpPublisher([n.http for n in nodes], admin.headers, concurrency=4)
    try:
        outage = await _stream_through_a_restart(publisher, redis_server, nodes, admin)
        streams = [(s.channel, s.stream) for s in sses]
        await wait_caught_up(publisher.results, streams, 10)
    finally:
        for sse in sses:
            await sse.close()

    counts = tally(publisher.results, streams)
    summary = {
        "published": len(publisher.results),
        "subscribers": len(sses),
        **vars(counts),
        "redis_down_s": round(outage.down_s, 2),
        "streams_reopened": sum(s.streams_opened - 1 for s in sses),
    }
    record_summary(report("redis-restart-sse", summary))
    assert counts.clean, counts
    assert counts.expected == counts.delivered

"""Fault scenario 5: PostgreSQL stops and starts again under a live `apix serve` node.

The node runs on its own embedded PostgreSQL (pgserver, in a temporary folder; the shared
server is not touched) and the shared Redis. While PostgreSQL is down, real-time traffic
(HTTP publish with an access token or an API key the node already read, WebSocket
delivery, new WebSocket connections) needs Redis only and must carry on with no loss;
requests that need the database (an API key the node has not read among them) must get
``503 {"error": {"code": "unavailable", ...}}`` at once (never 500, never a hang). Once
PostgreSQL is back, the same node serves them again without a restart.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from apix.client import ApixClient
from tests.conftest import Servers
from tests.faults.conftest import admin_on
from tests.faults.processes import Node, PostgresServer, start_node
from tests.faults.traffic import (
    AckSubscriber,
    HttpPublisher,
    SdkSubscriber,
    plan_events,
    report,
    tally,
    wait_caught_up,
)
from tests.identity.factories import PASSWORD, Account, new_api_key

pytestmark = pytest.mark.e2e

CHANNELS = ["room:pg-a", "room:pg-b"]
EVENTS = 900
RATE = 100.0  # events per second: the stream lasts ~9 s
DOWN_AT_S = 2.5  # into the stream
DOWN_FOR_S = 3.0
# A request must not wait for PostgreSQL to come back: it fails fast.
FAIL_FAST_S = 3.0


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    server = PostgresServer(tmp_path_factory.mktemp("pg"))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture(scope="module")
def node(
    servers: Servers, postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    node = start_node(
        "node-pg",
        database_url=postgres.url,
        redis_url=servers.redis_url,
        tmp=tmp_path_factory.mktemp("node"),
    )
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


class Probes:
    """Requests that need the database; every answer is recorded with its phase."""

    def __init__(self, admin: Account, api_key: str, *, seen: bool) -> None:
        self.requests: dict[str, tuple[str, str, dict[str, Any]]] = {
            "dead_letters": ("GET", "/api/v1/apix/dead-letters", {"headers": admin.headers}),
            "login": (
                "POST",
                "/api/v1/auth/login",
                {"json": {"email": admin.email, "password": PASSWORD}},
            ),
        }
        self.api_key = api_key
        if not seen:
            # A key this node has not read yet is looked up in PostgreSQL.
            self.requests["unseen_api_key_publish"] = _publish_with(api_key)
        self.answers: list[tuple[str, str, int, Any, float]] = []

    @classmethod
    async def make(cls, node: Node, *, seen: bool = False) -> Probes:
        """With ``seen`` the test uses the probes' API key before the outage (the node then
        keeps it for a minute), so it is not among the requests that need the database."""
        admin = await admin_on(node)
        async with httpx.AsyncClient(base_url=node.http, timeout=30) as http:
            key = (await new_api_key(http, admin, role="DEVELOPER"))["key"]
        return cls(admin, key, seen=seen)

    async def round(self, http: httpx.AsyncClient, phase: str) -> set[int]:
        statuses = set()
        for name, (method, path, kwargs) in self.requests.items():
            started = time.monotonic()
            response = await http.request(method, path, **kwargs)
            took = time.monotonic() - started
            body = response.json() if response.content else None
            self.answers.append((phase, name, response.status_code, body, took))
            statuses.add(response.status_code)
        return statuses

    def phase(self, phase: str) -> list[tuple[str, str, int, Any, float]]:
        return [a for a in self.answers if a[0] == phase]

    async def until_recovered(self, http: httpx.AsyncClient, timeout_s: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if await self.round(http, "after") <= {200, 201}:
                return time.monotonic() - started
            await asyncio.sleep(0.2)
        return None


@pytest.mark.timeout(120)
async def test_live_delivery_continues_while_postgres_restarts(
    node: Node, postgres: PostgresServer, record_summary: Any
) -> None:
    started = time.monotonic()
    admin = await admin_on(node)
    probes = await Probes.make(node, seen=True)
    pid = node.process.pid

    sdk = [SdkSubscriber(node.ws, admin.access_token, CHANNELS) for _ in range(3)]
    acks = [AckSubscriber([node.ws], admin.access_token, CHANNELS) for _ in range(2)]
    for subscriber in sdk:
        await subscriber.start()
    for ack_subscriber in acks:
        ack_subscriber.start()
    await asyncio.wait_for(asyncio.gather(*(s.ready.wait() for s in acks)), 15)
    publisher = HttpPublisher([node.http], admin.headers, concurrency=4)
    late = ApixClient(node.ws, token=admin.access_token, name="late")
    try:
        async with httpx.AsyncClient(base_url=node.http, timeout=30) as http:
            assert await probes.round(http, "before") <= {200, 201}
            publishing = asyncio.create_task(
                publisher.run(plan_events(EVENTS, CHANNELS), rate=RATE)
            )
            await asyncio.sleep(DOWN_AT_S)

            method, path, kwargs = _publish_with(probes.api_key)
            key_seen = await http.request(method, path, **kwargs)  # the node keeps the key
            await asyncio.to_thread(postgres.stop_server)
            down_at = time.monotonic()
            delivered_at_down = _delivered(sdk, acks)
            # A new WebSocket connection needs Redis only: it connects, subscribes and
            # publishes during the outage.
            await late.connect()
            late_sub = await late.subscribe("room:pg-late")
            sent = await late.publish("room:pg-late", "fault.late", {"n": -1})
            async for event in late_sub:
                if event.id == sent.id:
                    break
            # So does a publish with an API key the node already read.
            method, path, kwargs = _publish_with(probes.api_key)
            key_publish = await http.request(method, path, **kwargs)
            while time.monotonic() - down_at < DOWN_FOR_S:
                await probes.round(http, "down")
                await asyncio.sleep(0.2)
            delivered_while_down = _delivered(sdk, acks) - delivered_at_down

            await asyncio.to_thread(postgres.start_server)
            up_at = time.monotonic()
            recovered_after = await probes.until_recovered(http, 15)
            ready = (await http.get("/readyz")).status_code
            await publishing
        streams = [(c, s) for sub in sdk for c, s in sub.streams.items()]
        streams += [(c, s) for sub in acks for c, s in sub.streams.items()]
        caught_up_s = await wait_caught_up(publisher.results, streams, 20)
    finally:
        for subscriber in sdk:
            await subscriber.close()
        for ack_subscriber in acks:
            await ack_subscriber.close()
        await late.close()

    counts = tally(publisher.results, streams)
    down = probes.phase("down")
    summary = {
        "published": EVENTS,
        "acknowledged": publisher.acknowledged,
        "subscribers": len(sdk) + len(acks),
        **vars(counts),
        "delivered_while_down": delivered_while_down,
        "database_requests_while_down": dict(Counter(f"{a[1]}:{a[2]}" for a in down)),
        "slowest_database_request_while_down_s": round(max(a[4] for a in down), 3),
        "outage_s": round(up_at - down_at, 2),
        "database_requests_recovered_after_s": recovered_after,
        "caught_up_s": round(caught_up_s, 2),
        "publish_statuses": dict(publisher.statuses),
        "total_s": round(time.monotonic() - started, 2),
    }
    record_summary(report("postgres-restart", summary))

    assert node.process.poll() is None
    assert node.process.pid == pid  # the same process throughout
    assert publisher.acknowledged == EVENTS
    assert publisher.statuses == Counter({"201": EVENTS})  # publishing needs Redis only
    assert counts.clean, counts
    assert counts.expected == counts.delivered
    assert delivered_while_down > 0
    assert key_seen.status_code == 201, key_seen.text
    assert key_publish.status_code == 201, key_publish.text
    assert [e for s in acks for e in s.errors] == []
    assert down, "no request was sent while PostgreSQL was down"
    for _, name, status, body, took in down:
        assert status >= 500, (name, status, body)
        assert "error" in body, (name, body)
        assert took < FAIL_FAST_S, (name, took)
    assert recovered_after is not None, "database requests did not recover"
    assert ready == 200


@pytest.mark.timeout(60)
async def test_requests_needing_the_database_get_503_while_it_is_down(
    node: Node, postgres: PostgresServer, record_summary: Any
) -> None:
    probes = await Probes.make(node)
    async with httpx.AsyncClient(base_url=node.http, timeout=30) as http:
        await asyncio.to_thread(postgres.stop_server)
        try:
            for _ in range(3):
                await probes.round(http, "down")
        finally:
            await asyncio.to_thread(postgres.start_server)
        recovered_after = await probes.until_recovered(http, 15)
    down = probes.phase("down")
    summary = {
        "database_requests_while_down": dict(Counter(f"{a[1]}:{a[2]}" for a in down)),
        "error_codes_while_down": sorted({str(a[3]["error"]["code"]) for a in down}),
        "recovered_after_s": recovered_after,
    }
    record_summary(report("postgres-outage-errors", summary))
    assert recovered_after is not None
    for _, name, status, body, _ in down:
        assert (status, body["error"]["code"]) == (503, "unavailable"), (name, body)


def _publish_with(api_key: str) -> tuple[str, str, dict[str, Any]]:
    body = {"type": "probe.event", "data": {}}
    return (
        "POST",
        "/api/v1/apix/channels/room:pg-probe/events",
        {
            "headers": {"X-API-Key": api_key},
            "json": body,
        },
    )


def _delivered(sdk: list[SdkSubscriber], acks: list[AckSubscriber]) -> int:
    return sum(len(s.seen) for sub in [*sdk, *acks] for s in sub.streams.values())

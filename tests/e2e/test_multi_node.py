"""Two `apix serve` processes sharing PostgreSQL and Redis behave as one gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import Servers
from tests.e2e.test_embedded_serve import free_port, wait_ready
from tests.realtime.raw import connected

pytestmark = pytest.mark.e2e


@dataclass
class Node:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/apix/ws"


def _start(servers: Servers, tmp: Path, name: str) -> Node:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    env.update(
        {
            "APIX_DATABASE_URL": servers.database_url,
            "APIX_REDIS_URL": servers.redis_url,
            "APIX_NODE_ID": name,
            "APIX_DATA_DIR": str(tmp / name),
            "APIX_AUTH__KEYS_DIR": str(tmp / "keys"),  # shared, as in production
            "APIX_SERVER__PORT": str(port),
            "APIX_LOG__LEVEL": "WARNING",
        }
    )
    log = tmp / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "apix", "serve"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    return Node(name, port, process, log)


def _wait_ready(node: Node) -> None:
    wait_ready(node.http, node.process, node.log)


@pytest.fixture(scope="module")
def nodes(
    servers: Servers, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Node, Node]]:
    tmp = tmp_path_factory.mktemp("nodes")
    (tmp / "keys").mkdir()
    first = _start(servers, tmp, "node-a")
    _wait_ready(first)  # the first node creates the shared signing key
    second = _start(servers, tmp, "node-b")
    try:
        _wait_ready(second)
        yield first, second
    finally:
        for node in (first, second):
            node.process.send_signal(signal.SIGTERM)
        for node in (first, second):
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.process.kill()


@pytest.fixture
async def http_a(nodes: tuple[Node, Node]) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=nodes[0].http, timeout=10) as http:
        yield http


async def _admin(http: httpx.AsyncClient, slug: str) -> dict[str, str]:
    body = {
        "email": f"{slug}@example.com",
        "password": "a long password",
        "name": "Admin",
        "organization_name": slug,
        "organization_slug": slug,
    }
    assert (await http.post("/api/v1/auth/register", json=body)).status_code == 201
    tokens = (
        await http.post(
            "/api/v1/auth/login", json={"email": body["email"], "password": body["password"]}
        )
    ).json()
    return {"token": tokens["access_token"]}


async def test_events_published_on_one_node_reach_subscribers_on_the_other(
    nodes: tuple[Node, Node], http_a: httpx.AsyncClient
) -> None:
    a, b = nodes
    admin = await _admin(http_a, "multi-events")
    headers = {"Authorization": f"Bearer {admin['token']}"}
    async with connected(b.ws, admin["token"]) as on_b, connected(a.ws, admin["token"]) as on_a:
        await on_b.subscribe("room:cross")
        via_http = await http_a.post(
            "/api/v1/apix/channels/room:cross/events",
            headers=headers,
            json={"type": "chat.message", "data": {"n": 1}},
        )
        assert via_http.status_code == 201
        via_ws = await on_a.command(
            "publish", channel="room:cross", type="chat.message", data={"n": 2}
        )
        assert via_ws["ok"], via_ws
        events = await on_b.events(2)
        assert [e["data"]["n"] for e in events] == [1, 2]
        assert events[0]["offset"] == via_http.json()["offset"]
        assert events[1]["offset"] == via_ws["result"]["offset"]


async def test_presence_spans_nodes_and_kick_works_across_them(
    nodes: tuple[Node, Node], http_a: httpx.AsyncClient
) -> None:
    a, b = nodes
    admin = await _admin(http_a, "multi-presence")
    headers = {"Authorization": f"Bearer {admin['token']}"}
    async with connected(a.ws, admin["token"]) as on_a, connected(b.ws, admin["token"]) as on_b:
        await on_a.subscribe("room:here", presence=True)
        await on_b.subscribe("room:here", presence=True)
        for node in (a, b):
            async with httpx.AsyncClient(base_url=node.http) as http:
                clients = (
                    await http.get("/api/v1/apix/channels/room:here/presence", headers=headers)
                ).json()["clients"]
            assert len(clients) == 2, node.name
        # Nodes announce themselves every few seconds (another test's clean-up flushed Redis).
        on_node_b: list[dict[str, str]] = []
        deadline = time.monotonic() + 15
        while not on_node_b and time.monotonic() < deadline:
            listed = (await http_a.get("/api/v1/apix/connections", headers=headers)).json()
            on_node_b = [c for c in listed if c["node"] == "node-b"]
            await asyncio.sleep(0.2)
        assert len(on_node_b) == 1
        kicked = await http_a.delete(
            f"/api/v1/apix/connections/{on_node_b[0]['connection_id']}", headers=headers
        )
        assert kicked.status_code == 204
        code, _ = await on_b.closed()
        assert code == 4010
        # Its presence is gone too, seen from the other node.
        await asyncio.sleep(0.2)
        clients = (
            await http_a.get("/api/v1/apix/channels/room:here/presence", headers=headers)
        ).json()["clients"]
        assert len(clients) == 1


async def test_sse_resume_works_against_either_node(
    nodes: tuple[Node, Node], http_a: httpx.AsyncClient
) -> None:
    b = nodes[1]
    admin = await _admin(http_a, "multi-sse")
    headers = {"Authorization": f"Bearer {admin['token']}"}
    offsets = []
    for n in range(5):
        response = await http_a.post(
            "/api/v1/apix/channels/room:feed/events",
            headers=headers,
            json={"type": "feed.item", "data": {"n": n}},
        )
        offsets.append(response.json())
    position = f"room:feed|{offsets[1]['epoch']}|{offsets[1]['offset']}"
    async with (
        httpx.AsyncClient(base_url=b.http, timeout=10) as http_b,
        http_b.stream(
            "GET",
            "/api/v1/apix/sse",
            params={"channel": "room:feed"},
            headers={**headers, "Last-Event-ID": position},
        ) as stream,
    ):
        assert stream.status_code == 200
        ids = []
        async for line in stream.aiter_lines():
            if line.startswith("id: "):
                ids.append(line[4:])
            if len(ids) == 3:
                break
    assert ids == [f"room:feed|{o['epoch']}|{o['offset']}" for o in offsets[2:]]

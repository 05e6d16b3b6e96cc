"""Conformance: PROTOCOL.md sections 1-3, 7, 9 and 10 (transports, frames, connecting, other
commands, close codes, limits), checked over a real socket with a raw client.

Each test is written against the protocol page, not against the gateway's code. Timers are
configured short (a node with its own settings) so the whole file runs in seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import pytest
import websockets
from cryptography.hazmat.primitives.asymmetric import rsa
from websockets.exceptions import InvalidStatus

from apix.app import create_app
from apix.config import RealtimeSettings, Settings
from apix.realtime.broker import offset_key
from tests.conftest import LiveServer, Servers, make_settings, serve_app
from tests.identity.factories import Account, new_api_key, new_member, new_org_admin
from tests.realtime.raw import Raw, connected, raw_socket

CONNECTIONS = "/api/v1/apix/connections"
ESTABLISHED_FIELDS = {
    "type",
    "connection_id",
    "session",
    "org_id",
    "user_id",
    "node",
    "ping_interval_ms",
    "token_expires_at",
    "resumed",
    "subscriptions",
}


# --- helpers -------------------------------------------------------------------------------


@dataclass
class Node:
    """An APIX node with its own settings: the app, an HTTP client on it, its live socket."""

    app: Any
    settings: Settings
    http: httpx.AsyncClient
    live: LiveServer


@asynccontextmanager
async def node(servers: Servers, **overrides: object) -> AsyncIterator[Node]:
    settings = make_settings(servers, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t") as http,
            serve_app(app, settings) as live,
        ):
            yield Node(app, settings, http, live)


def claims_of(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})  # type: ignore[no-any-return]


def craft_token(app: Any, account: Account, *, expires_in: int) -> str:
    """``account``'s access token re-signed by the node's key with ``exp`` = now + expires_in."""
    claims = claims_of(account.access_token)
    now = int(time.time())
    claims.update(
        iat=min(now, now + expires_in - 60),
        nbf=min(now, now + expires_in - 60),
        exp=now + expires_in,
        jti=uuid.uuid4().hex,
    )
    key = app.state.identity.keyring.current
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})


async def until(
    raw: Raw, match: Callable[[dict[str, Any]], bool], within: float = 5.0
) -> dict[str, Any]:
    """The first frame (already collected or still to come) that ``match``es."""
    for index, frame in enumerate(raw.frames):
        if match(frame):
            return raw.frames.pop(index)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        frame = await raw.recv(max(0.01, deadline - loop.time()))
        if match(frame):
            return frame
        raw.frames.append(frame)


async def error_code(raw: Raw, op: str, **fields: Any) -> str:
    reply = await raw.command(op, **fields)
    assert reply["ok"] is False, reply
    return reply["error"]["code"]  # type: ignore[no-any-return]


async def still_open(raw: Raw) -> None:
    """The connection still answers commands."""
    reply = await raw.command("ping")
    assert reply["ok"] is True, reply


def connection_ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [c["connection_id"] for c in response.json()]


# --- section 10 defaults -------------------------------------------------------------------


def test_default_limits_are_the_documented_ones() -> None:
    defaults = RealtimeSettings()
    assert defaults.connect_timeout_ms == 5_000  # section 3: connect within 5 s
    assert defaults.pong_timeout_ms == 10_000  # section 7: no pong within 10 s
    assert defaults.max_frame_bytes == 64 * 1024  # sections 2 and 10
    assert defaults.send_buffer_bytes == 1024 * 1024  # section 9, 4011
    assert defaults.commands_per_second == 100
    assert defaults.command_burst == 200
    assert defaults.max_subscriptions == 256
    assert defaults.publishes_per_second == 10


# --- section 1: transports -----------------------------------------------------------------


async def test_subprotocol_apix_v1_is_accepted_when_offered(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws, subprotocols=["other.v9", "apix.v1"]) as raw:
        assert raw.ws.subprotocol == "apix.v1"
        await raw.connect(admin.access_token)
    # The subprotocol is optional: a client offering none is served too.
    async with raw_socket(live.ws) as raw:
        assert raw.ws.subprotocol is None
        await raw.connect(admin.access_token)
        await still_open(raw)


async def test_permessage_deflate_is_negotiated_when_offered(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws, compression="deflate") as raw:
        assert raw.ws.response is not None
        extensions = raw.ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert "permessage-deflate" in extensions
        await raw.connect(admin.access_token)
        await still_open(raw)


async def test_upgrade_from_an_origin_not_allowed_is_refused_with_403(servers: Servers) -> None:
    async with node(servers, server={"allowed_origins": ["https://good.example"]}) as n:
        admin = await new_org_admin(n.http)
        with pytest.raises(InvalidStatus) as refused:
            async with raw_socket(n.live.ws, origin="https://evil.example"):
                pass
        assert refused.value.response.status_code == 403
        async with raw_socket(n.live.ws, origin="https://good.example") as raw:
            await raw.connect(admin.access_token)
            await still_open(raw)
        # No Origin header (not a browser): nothing to check.
        async with connected(n.live.ws, admin.access_token) as raw:
            await still_open(raw)


async def test_no_allowed_origins_means_no_browser_origin_and_no_cors(servers: Servers) -> None:
    async with node(servers, server={"allowed_origins": []}) as n:
        admin = await new_org_admin(n.http)
        with pytest.raises(InvalidStatus) as refused:
            async with raw_socket(n.live.ws, origin="https://any.example"):
                pass
        assert refused.value.response.status_code == 403
        preflight = await n.http.options(
            "/api/v1/auth/profile",
            headers={"Origin": "https://any.example", "Access-Control-Request-Method": "GET"},
        )
        assert "access-control-allow-origin" not in preflight.headers
        async with connected(n.live.ws, admin.access_token) as raw:  # no Origin: not a browser
            await still_open(raw)


async def test_by_default_any_origin_may_connect_and_call_the_api(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws, origin="https://any.example") as raw:
        await raw.connect(admin.access_token)
        await still_open(raw)
    response = await client.get(
        "/api/v1/auth/profile", headers={**admin.headers, "Origin": "https://any.example"}
    )
    assert response.headers["access-control-allow-origin"] in ("*", "https://any.example")


async def test_connect_from_an_origin_the_organisation_does_not_allow_is_forbidden(
    servers: Servers,
) -> None:
    allowed = ["https://app.example", "https://other.example"]
    async with node(servers, server={"allowed_origins": allowed}) as n:
        admin = await new_org_admin(n.http)
        patched = await n.http.patch(
            "/api/v1/admin/organization",
            headers=admin.headers,
            json={"allowed_origins": ["https://app.example"]},
        )
        assert patched.status_code == 200, patched.text
        async with raw_socket(n.live.ws, origin="https://other.example") as raw:
            assert await error_code(raw, "connect", token=admin.access_token) == "forbidden"
            assert (await raw.closed())[0] == 4001
        async with raw_socket(n.live.ws, origin="https://app.example") as raw:
            await raw.connect(admin.access_token)
            await still_open(raw)


# --- section 3: connecting -----------------------------------------------------------------


async def test_established_result_has_every_documented_field(
    client: httpx.AsyncClient, live: LiveServer, settings: Settings
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        result = await raw.connect(
            admin.access_token, client={"type": "WEB_APP", "name": "console", "version": "1.2.0"}
        )
        assert not ESTABLISHED_FIELDS - set(result), "missing fields"
        assert result["type"] == "connection.established"
        assert isinstance(result["connection_id"], str)
        assert result["connection_id"]
        assert isinstance(result["session"], str)
        assert result["session"]
        assert result["org_id"] == admin.org_id
        assert result["user_id"] == admin.user_id
        assert result["node"] == settings.node_id
        assert result["ping_interval_ms"] == settings.realtime.ping_interval_ms
        assert result["token_expires_at"] == claims_of(admin.access_token)["exp"] * 1000
        assert result["resumed"] is False
        assert result["subscriptions"] == []


async def test_each_connection_gets_its_own_id(client: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as one, raw_socket(live.ws) as two:
        first, second = await one.connect(admin.access_token), await two.connect(admin.access_token)
    assert first["connection_id"] != second["connection_id"]
    assert first["session"] != second["session"]


async def test_api_key_connects_without_a_user(client: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(client)
    key = await new_api_key(client, admin, role="DEVELOPER")
    async with raw_socket(live.ws) as raw:
        result = await raw.connect(key["key"])
        assert result["type"] == "connection.established"
        assert result["org_id"] == admin.org_id
        assert result["user_id"] is None
        await still_open(raw)


async def test_no_connect_in_time_closes_4008(servers: Servers) -> None:
    async with node(servers, realtime={"connect_timeout_ms": 300}) as n:
        started = time.monotonic()
        async with raw_socket(n.live.ws) as raw:
            code, _ = await raw.closed(timeout=3)
        assert code == 4008
        assert time.monotonic() - started >= 0.25


async def test_each_connection_gets_its_own_connect_time(servers: Servers) -> None:
    """Connections opened at different moments are each closed (4008) once their own time is
    up, not before and not much after; one that connects meanwhile stays open."""
    timeout = 0.4
    async with node(servers, realtime={"connect_timeout_ms": int(timeout * 1000)}) as n:
        admin = await new_org_admin(n.http)

        async def silent(delay: float) -> float:
            await asyncio.sleep(delay)
            async with raw_socket(n.live.ws) as raw:
                opened = time.monotonic()
                code, _ = await raw.closed(timeout=3)
                assert code == 4008
                return time.monotonic() - opened

        async with raw_socket(n.live.ws) as late_joiner:
            waited = asyncio.gather(*(silent(d) for d in (0.0, 0.13, 0.26, 0.5)))
            await asyncio.sleep(0.2)
            await late_joiner.connect(admin.access_token)  # half its time gone
            for elapsed in await waited:
                assert timeout - 0.01 <= elapsed <= timeout * 1.25 + 0.1, elapsed
            await asyncio.sleep(0.3)  # past its own deadline too
            await still_open(late_joiner)


async def test_connect_in_time_keeps_the_connection(servers: Servers) -> None:
    async with node(servers, realtime={"connect_timeout_ms": 300}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            await asyncio.sleep(0.6)  # twice the connect timeout
            await still_open(raw)
            assert not [f for f in raw.frames if f.get("op") == "disconnect"]


def _foreign_token(admin: Account, kid: str) -> str:
    """``admin``'s claims signed by a key that is not the node's (but naming its kid)."""
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(
        claims_of(admin.access_token), stranger, algorithm="RS256", headers={"kid": kid}
    )


@pytest.mark.parametrize("kind", ["garbage", "foreign_signature"])
async def test_bad_token_is_unauthorized_then_4001(
    client: httpx.AsyncClient, live: LiveServer, app: Any, kind: str
) -> None:
    admin = await new_org_admin(client)
    token = (
        "not-a-token"
        if kind == "garbage"
        else _foreign_token(admin, app.state.identity.keyring.current.kid)
    )
    async with raw_socket(live.ws) as raw:
        assert await error_code(raw, "connect", token=token) == "unauthorized"
        assert (await raw.closed())[0] == 4001


async def test_expired_token_is_token_expired_then_4001(
    client: httpx.AsyncClient, live: LiveServer, app: Any
) -> None:
    admin = await new_org_admin(client)
    expired = craft_token(app, admin, expires_in=-120)
    async with raw_socket(live.ws) as raw:
        assert await error_code(raw, "connect", token=expired) == "token_expired"
        assert (await raw.closed())[0] == 4001
    # The crafting is sound: the same claims with a future exp are accepted.
    async with connected(live.ws, craft_token(app, admin, expires_in=600)) as raw:
        await still_open(raw)


@pytest.mark.parametrize(
    ("op", "fields"),
    [("subscribe", {"channel": "room:lobby"}), ("ping", {}), ("history", {"channel": "org"})],
)
async def test_command_before_connect_is_unauthorized_then_4001(
    live: LiveServer, op: str, fields: dict[str, Any]
) -> None:
    async with raw_socket(live.ws) as raw:
        assert await error_code(raw, op, **fields) == "unauthorized"
        assert (await raw.closed())[0] == 4001


# --- section 2: frames ---------------------------------------------------------------------


async def test_non_json_frame_gets_bad_request_and_stays_open(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send("this is {not json")
        reply = await raw.recv()
        assert reply["op"] == "reply"
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert isinstance(reply["error"]["message"], str)
        await still_open(raw)


@pytest.mark.parametrize("frame", ["[1, 2, 3]", '"connect"', "42", "null"])
async def test_json_that_is_not_an_object_gets_bad_request(
    client: httpx.AsyncClient, live: LiveServer, frame: str
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send(frame)
        reply = await raw.recv()
        assert reply["op"] == "reply"
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        await still_open(raw)


@pytest.mark.parametrize("command_id", [77, "abc-1"])
async def test_unknown_op_gets_bad_request_with_its_id(
    client: httpx.AsyncClient, live: LiveServer, command_id: int | str
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send({"op": "teleport", "id": command_id})
        reply = await raw.recv()
        assert reply == {
            "op": "reply",
            "id": command_id,
            "ok": False,
            "error": reply["error"],
        }
        assert reply["error"]["code"] == "bad_request"
        await still_open(raw)


async def test_three_bad_frames_in_a_row_close_4000(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send("bad 1")
        await raw.send("[2]")
        await raw.send({"op": "nope"})
        code, _ = await raw.closed()
        replies = [f for f in raw.frames if f.get("op") == "reply"]
        assert [r["error"]["code"] for r in replies[:2]] == ["bad_request"] * 2
        assert code == 4000


async def test_the_third_bad_frame_still_gets_its_reply_before_4000(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    """Section 2: a command with an id gets exactly one reply, even the one that ends the
    connection."""
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send({"op": "nope", "id": 1})
        await raw.send({"op": "nope", "id": 2})
        await raw.send({"op": "nope", "id": 3})
        code, _ = await raw.closed()
        replies = [f for f in raw.frames if f.get("op") == "reply"]
        assert [(r["id"], r["error"]["code"]) for r in replies] == [
            (1, "bad_request"),
            (2, "bad_request"),
            (3, "bad_request"),
        ]
        assert code == 4000


async def test_a_good_frame_resets_the_bad_frame_count(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        for _ in range(3):
            await raw.send("bad")
            await raw.send({"op": "nope"})
            await still_open(raw)  # two bad, one good: never three in a row
        assert len([f for f in raw.frames if f.get("op") == "reply"]) == 6
        await raw.send("bad")
        await raw.send("bad")
        await raw.send("bad")
        assert (await raw.closed())[0] == 4000


def _ping_of_size(size: int, command_id: int) -> str:
    """A `ping` command frame of exactly ``size`` bytes (unknown fields are ignored)."""
    head = json.dumps({"op": "ping", "id": command_id, "pad": ""})[:-2]
    frame = head + "x" * (size - len(head) - 2) + '"}'
    assert len(frame.encode()) == size
    return frame


async def test_frame_at_the_default_limit_is_accepted_larger_closes_1009(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send(_ping_of_size(64 * 1024, 501))
        reply = await raw.recv()
        assert reply["id"] == 501
        assert reply["ok"] is True
        await raw.send(_ping_of_size(64 * 1024 + 1, 502))
        code, _ = await raw.closed()
        assert code == 1009
        assert not [f for f in raw.frames if f.get("id") == 502]


async def test_frame_limit_is_configurable(servers: Servers) -> None:
    async with node(servers, realtime={"max_frame_bytes": 2048}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            await raw.send(_ping_of_size(2000, 601))
            assert (await raw.recv())["id"] == 601
            await raw.send(_ping_of_size(3000, 602))
            assert (await raw.closed())[0] == 1009


async def test_every_command_with_an_id_gets_exactly_one_reply(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        commands: list[dict[str, Any]] = [
            {"op": "ping", "id": 1},
            {"op": "subscribe", "id": "sub", "channel": "room:lobby"},
            {"op": "subscribe", "id": 3, "channel": "room:lobby"},  # conflict
            {"op": "subscribe", "id": 4, "channel": "Not A Channel!"},  # bad_request
            {"op": "subscribe", "id": 5, "channel": "nowhere:x"},  # not_found
            {"op": "history", "id": 6, "channel": "room:lobby", "limit": 5},
            {"op": "publish", "id": 7, "channel": "room:lobby", "type": "chat.msg", "data": 1},
            {"op": "presence", "id": 8, "channel": "room:lobby"},
            {"op": "unsubscribe", "id": 9, "channel": "room:lobby"},
            {"op": "history", "id": 10, "channel": "room:lobby", "limit": 0},  # bad_request
        ]
        for command in commands:
            await raw.send(command)
        await raw.send({"op": "ping", "id": "last"})
        replies: list[dict[str, Any]] = []
        while True:
            frame = await raw.recv()
            if frame.get("op") != "reply":
                continue
            if frame.get("id") == "last":
                break
            replies.append(frame)
        assert sorted(str(r["id"]) for r in replies) == sorted(str(c["id"]) for c in commands)
        by_id = {r["id"]: r for r in replies}
        assert [by_id[i]["ok"] for i in (1, "sub", 6, 7, 8, 9)] == [True] * 6, by_id
        assert by_id[3]["error"]["code"] == "conflict"
        assert by_id[4]["error"]["code"] == "bad_request"
        assert by_id[5]["error"]["code"] == "not_found"
        assert by_id[10]["error"]["code"] == "bad_request"


async def test_a_command_without_an_id_gets_no_reply(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.send({"op": "ping"})
        await raw.send({"op": "subscribe", "channel": "room:quiet"})
        await raw.send({"op": "ping", "id": "with-id"})
        # Frames are ordered: the first reply to arrive must be the one with an id.
        first = await raw.recv()
        assert first["op"] == "reply"
        assert first["id"] == "with-id"
        assert first["ok"] is True
        # The subscribe without an id still happened.
        assert await error_code(raw, "subscribe", channel="room:quiet") == "conflict"


# --- section 7: ping, heartbeat, expiry, refresh -------------------------------------------


async def test_ping_command_returns_the_server_time(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as raw:
        before = int(time.time() * 1000)
        reply = await raw.command("ping")
        after = int(time.time() * 1000)
        assert reply["ok"] is True
        ts = reply["result"]["ts"]
        assert isinstance(ts, int)
        assert before - 1000 <= ts <= after + 1000


HEARTBEAT = {"ping_interval_ms": 200, "pong_timeout_ms": 300}


async def test_answering_server_pings_keeps_the_connection_alive(servers: Servers) -> None:
    async with node(servers, realtime=HEARTBEAT) as n:
        admin = await new_org_admin(n.http)
        async with raw_socket(n.live.ws) as raw:
            result = await raw.connect(admin.access_token)
            assert result["ping_interval_ms"] == 200
            pings: list[dict[str, Any]] = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 1.5  # several intervals and pong timeouts
            while loop.time() < deadline:
                try:
                    frame = await raw.recv(timeout=deadline - loop.time())
                except TimeoutError:
                    break
                assert frame.get("op") == "ping", frame
                assert set(frame) == {"op", "ts"}
                assert isinstance(frame["ts"], int)
                pings.append(frame)
                await raw.send({"op": "pong", "ts": frame["ts"]})
            assert len(pings) >= 4
            assert [p["ts"] for p in pings] == sorted(p["ts"] for p in pings)
            await still_open(raw)


async def test_unanswered_ping_closes_4009(servers: Servers) -> None:
    async with node(servers, realtime=HEARTBEAT) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            ping = await until(raw, lambda f: f.get("op") == "ping", within=2)
            seen = time.monotonic()
            code, _ = await raw.closed(timeout=3)
            assert code == 4009
            assert time.monotonic() - seen >= 0.1  # not at once: after the pong timeout
            assert isinstance(ping["ts"], int)


async def test_a_pong_with_the_wrong_ts_does_not_count(servers: Servers) -> None:
    async with node(servers, realtime=HEARTBEAT) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            ping = await until(raw, lambda f: f.get("op") == "ping", within=2)
            await raw.send({"op": "pong", "ts": ping["ts"] - 1})
            assert (await raw.closed(timeout=3))[0] == 4009


async def test_each_connection_keeps_its_own_heartbeat(servers: Servers) -> None:
    """The node pings and times out connections in sweeps: one that stops answering is
    closed after its own pong timeout, and only it; the other is pinged on an interval after
    each pong, though the node's next deadline is then the silent one's pong timeout (five
    intervals away)."""
    async with node(servers, realtime={"ping_interval_ms": 200, "pong_timeout_ms": 1000}) as n:
        admin = await new_org_admin(n.http)
        async with (
            connected(n.live.ws, admin.access_token) as silent,
            connected(n.live.ws, admin.access_token) as answering,
        ):
            ping = await until(silent, lambda f: f.get("op") == "ping", within=2)
            answered: list[float] = []

            async def answer() -> None:
                while True:
                    frame = await until(answering, lambda f: f.get("op") == "ping", within=2)
                    answered.append(time.monotonic())
                    await answering.send({"op": "pong", "ts": frame["ts"]})

            task = asyncio.create_task(answer())
            try:
                code, _ = await silent.closed(timeout=3)
                closed_after = time.time() - ping["ts"] / 1000  # since the node sent the ping
                await asyncio.sleep(0.5)  # two more intervals
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
            assert code == 4009
            assert 0.95 <= closed_after <= 2.5  # its 1 s timeout (and a sweep) after its ping
            assert len(answered) >= 6
            gaps = [b - a for a, b in itertools.pairwise(answered)]
            assert all(0.15 <= gap <= 0.6 for gap in gaps), gaps  # 200 ms after each pong
            await still_open(answering)


async def test_a_pong_is_read_the_same_whatever_its_shape(servers: Servers) -> None:
    """The usual pong (`ts` an integer) takes a shortcut; any other shape is validated as a
    command, as before: a numeric string or extra fields still count; a pong without `ts`
    gets a `bad_request` reply and does not count. (The server pings again only once the
    previous ping was answered, and closes 4009 when it was not.)"""
    async with node(servers, realtime=HEARTBEAT) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            for shape in ("string", "extra", "id", "int"):
                ping = await until(raw, lambda f: f.get("op") == "ping", within=2)
                pong: dict[str, Any] = {"op": "pong", "ts": ping["ts"]}
                if shape == "string":
                    pong["ts"] = str(ping["ts"])
                elif shape == "extra":
                    pong["note"] = "ignored"
                elif shape == "id":
                    pong["id"] = 7
                await raw.send(pong)
            await until(raw, lambda f: f.get("op") == "ping", within=2)  # the last counted
            missing = await raw.command("pong")
            assert missing["ok"] is False
            assert missing["error"]["code"] == "bad_request"
            assert (await raw.closed(timeout=3))[0] == 4009


async def test_measured_latency_is_reported_for_the_connection(servers: Servers) -> None:
    """Section 7: the ping/pong round trip is the connection's measured latency (shown by
    the connection list as `rtt_ms`)."""
    async with node(servers, realtime=HEARTBEAT | {"registry_flush_s": 0.1}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            for _ in range(2):
                ping = await until(raw, lambda f: f.get("op") == "ping", within=2)
                await raw.send({"op": "pong", "ts": ping["ts"]})
            await asyncio.sleep(0.3)
            listed = await n.http.get(CONNECTIONS, headers=admin.headers)
            assert listed.status_code == 200, listed.text
            (mine,) = listed.json()
            assert mine["rtt_ms"] is not None
            assert 0 <= mine["rtt_ms"] < 1000


async def test_token_expiry_sends_disconnect_then_closes_4003(
    client: httpx.AsyncClient, live: LiveServer, app: Any
) -> None:
    admin = await new_org_admin(client)
    token = craft_token(app, admin, expires_in=2)
    expires_at = claims_of(token)["exp"]
    async with raw_socket(live.ws) as raw:
        result = await raw.connect(token)
        assert result["token_expires_at"] == expires_at * 1000
        code, _ = await raw.closed(timeout=6)
        closed_at = time.time()
        assert code == 4003
        assert raw.frames[-1] == {
            "op": "disconnect",
            "code": 4003,
            "reason": "token expired",
            "reconnect": True,
        }
        assert closed_at >= expires_at - 0.5  # not before the token expired


async def test_refresh_pushes_the_expiry_and_the_connection_survives(
    client: httpx.AsyncClient, live: LiveServer, app: Any
) -> None:
    admin = await new_org_admin(client)
    short = craft_token(app, admin, expires_in=2)
    old_expiry = claims_of(short)["exp"]
    async with connected(live.ws, short) as raw:
        reply = await raw.command("refresh", token=admin.access_token)
        assert reply["ok"] is True, reply
        assert reply["result"]["token_expires_at"] == claims_of(admin.access_token)["exp"] * 1000
        await asyncio.sleep(max(0.0, old_expiry - time.time()) + 1.0)
        await still_open(raw)
        assert not [f for f in raw.frames if f.get("op") == "disconnect"]


async def test_refresh_with_another_users_token_is_forbidden(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    colleague = await new_member(client, admin, "DEVELOPER")
    async with connected(live.ws, admin.access_token) as raw:
        assert await error_code(raw, "refresh", token=colleague.access_token) == "forbidden"
        await still_open(raw)


# --- section 10: rate limits ---------------------------------------------------------------


async def _pings_at_once(raw: Raw, count: int) -> list[dict[str, Any]]:
    """Send ``count`` pings without waiting; their replies, in order."""
    ids = [f"burst-{i}" for i in range(count)]
    for command_id in ids:
        await raw.send({"op": "ping", "id": command_id})
    replies: dict[str, dict[str, Any]] = {}
    while len(replies) < count:
        frame = await raw.recv()
        if frame.get("op") == "reply":
            replies[frame["id"]] = frame
    return [replies[i] for i in ids]


async def test_commands_over_the_burst_are_rate_limited(servers: Servers) -> None:
    async with node(servers, realtime={"command_burst": 10, "commands_per_second": 20}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            replies = await _pings_at_once(raw, 14)
            assert all(r["ok"] for r in replies[:10]), replies
            limited = [r for r in replies[10:] if not r["ok"]]
            assert limited, replies
            assert {r["error"]["code"] for r in limited} == {"rate_limited"}


async def test_a_burst_up_to_command_burst_is_admitted(servers: Servers) -> None:
    """`command_burst` commands at once are admitted even when it exceeds the per-second
    rate (PROTOCOL.md section 10: "100 commands/s per connection (burst 200)")."""
    async with node(servers, realtime={"command_burst": 20, "commands_per_second": 5}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            replies = await _pings_at_once(raw, 24)
            assert [r["ok"] for r in replies[:20]] == [True] * 20, replies
            assert any(not r["ok"] for r in replies[20:]), replies


async def test_commands_below_the_rate_are_never_limited(servers: Servers) -> None:
    """At half of `commands_per_second`, evenly spaced, no command is ever refused."""
    async with node(servers, realtime={"command_burst": 5, "commands_per_second": 20}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            outcomes: list[str] = []
            for _ in range(12):  # 10 commands/s for 1.2 s
                try:
                    reply = await raw.command("ping")
                except websockets.ConnectionClosed as closed:
                    outcomes.append(f"closed {closed.rcvd.code if closed.rcvd else None}")
                    break
                outcomes.append("ok" if reply["ok"] else reply["error"]["code"])
                await asyncio.sleep(0.1)
            assert outcomes == ["ok"] * 12


async def test_publishes_over_the_per_channel_rate_are_rate_limited(servers: Servers) -> None:
    async with node(servers, realtime={"publishes_per_second": 3}) as n:
        admin = await new_org_admin(n.http)
        async with connected(n.live.ws, admin.access_token) as raw:
            outcomes = []
            for i in range(5):
                reply = await raw.command("publish", channel="room:a", type="chat.msg", data=i)
                outcomes.append("ok" if reply["ok"] else reply["error"]["code"])
            assert outcomes[:3] == ["ok"] * 3
            assert outcomes[3:] == ["rate_limited"] * 2
            # Per channel: another channel is not affected.
            other = await raw.command("publish", channel="room:b", type="chat.msg", data=0)
            assert other["ok"] is True, other
            # Per second: a second later, the first channel takes publishes again.
            await asyncio.sleep(1.1)
            again = await raw.command("publish", channel="room:a", type="chat.msg", data=9)
            assert again["ok"] is True, again


# --- section 9: server-initiated closes ----------------------------------------------------


async def _small_window_socket(port: int) -> socket.socket:
    """A TCP socket to the node whose receive buffer is tiny, so the server cannot park
    much in the client's kernel while the client is not reading."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return sock


async def test_slow_consumer_is_closed_4011_others_keep_receiving(servers: Servers) -> None:
    async with node(servers, realtime={"send_buffer_bytes": 65536}) as n:
        admin = await new_org_admin(n.http)
        channel = "room:firehose"
        async with connected(n.live.ws, admin.access_token) as fast:
            await fast.subscribe(channel)
            received: list[dict[str, Any]] = []

            async def read_fast() -> None:
                while True:
                    frame = await fast.recv(timeout=30)
                    if frame.get("op") == "event":
                        received.append(frame)
                    elif frame.get("op") == "ping":
                        await fast.send({"op": "pong", "ts": frame["ts"]})

            reader = asyncio.create_task(read_fast())
            try:
                await _overflow_a_slow_subscriber(n, admin, channel, reader, received)
            finally:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
            await still_open(fast)


async def _overflow_a_slow_subscriber(
    n: Node,
    admin: Account,
    channel: str,
    reader: asyncio.Task[None],
    received: list[dict[str, Any]],
) -> None:
    sock = await _small_window_socket(n.live.port)
    async with raw_socket(n.live.ws, sock=sock, max_queue=1, compression=None) as slow:
        slow_id = (await slow.connect(admin.access_token))["connection_id"]
        await slow.subscribe(channel)
        # From here the slow client reads nothing.
        published: list[str] = []
        for i in range(2000):
            response = await n.http.post(
                f"/api/v1/apix/channels/{channel}/events",
                headers=admin.headers,
                json={"type": "load.tick", "data": {"i": i, "blob": os.urandom(3000).hex()}},
            )
            assert response.status_code == 201, response.text
            published.append(response.json()["offset"])
            if i % 10 == 9:
                listed = await n.http.get(CONNECTIONS, headers=admin.headers)
                if slow_id not in connection_ids(listed):
                    break
        assert slow_id not in connection_ids(
            await n.http.get(CONNECTIONS, headers=admin.headers)
        ), "the slow consumer was never disconnected"
        # The normal subscriber got every event, in order, and is still connected.
        deadline = time.monotonic() + 10
        while len(received) < len(published) and time.monotonic() < deadline:
            assert not reader.done(), reader
            await asyncio.sleep(0.05)
        assert [e["offset"] for e in received] == published
        # The slow one, reading at last, finds 4011 after what had been sent.
        code, _ = await slow.closed(timeout=10)
        assert code == 4011


@pytest.mark.parametrize("burst", [1, 8])
async def test_a_slow_consumer_resumes_from_what_it_was_actually_sent(
    servers: Servers, burst: int
) -> None:
    """Frames still queued when a slow consumer is closed (4011) were never sent: its
    session's positions exclude them, so a resume replays them, without gap or repeat.
    With bursts of publishes at once, the events reach the node together and are fanned
    out together (one write a socket): the same holds."""
    # Larger than the socket's own write buffer: frames wait in the queue once it is full.
    async with node(servers, realtime={"send_buffer_bytes": 262144}) as n:
        admin = await new_org_admin(n.http)
        channel = "room:slow-resume"
        sock = await _small_window_socket(n.live.port)
        published: list[str] = []
        async with raw_socket(n.live.ws, sock=sock, max_queue=1, compression=None) as slow:
            hello = await slow.connect(admin.access_token)
            await slow.subscribe(channel)
            for i in range(0, 2000, burst):
                responses = await asyncio.gather(
                    *(
                        n.http.post(
                            f"/api/v1/apix/channels/{channel}/events",
                            headers=admin.headers,
                            json={
                                "type": "load.tick",
                                "data": {"i": i + j, "blob": os.urandom(3000).hex()},
                            },
                        )
                        for j in range(burst)
                    )
                )
                published += [r.json()["offset"] for r in responses]
                if (i // burst) % 10 == 9:
                    listed = await n.http.get(CONNECTIONS, headers=admin.headers)
                    if hello["connection_id"] not in connection_ids(listed):
                        break
            published.sort(key=offset_key)
            got: list[str] = []
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frame = await slow.recv(timeout=10)
                    if frame.get("op") == "event":
                        got.append(frame["offset"])
        assert 0 < len(got) < len(published)
        async with raw_socket(n.live.ws) as again:
            resumed = await again.connect(admin.access_token, resume=hello["session"])
            (sub,) = resumed["subscriptions"]
            replay = [e["offset"] for e in await again.events(sub["replayed"], timeout=10)]
        assert got + replay == published


async def test_admin_lists_and_kicks_a_connection_4010(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        result = await raw.connect(
            admin.access_token, client={"type": "WEB_APP", "name": "console", "version": "1"}
        )
        connection_id = result["connection_id"]
        listed = await client.get(CONNECTIONS, headers=admin.headers)
        assert connection_id in connection_ids(listed)
        (mine,) = [c for c in listed.json() if c["connection_id"] == connection_id]
        assert mine["user_id"] == admin.user_id
        assert mine["client_type"] == "WEB_APP"
        kicked = await client.delete(f"{CONNECTIONS}/{connection_id}", headers=admin.headers)
        assert kicked.status_code == 204, kicked.text
        code, _ = await raw.closed()
        assert code == 4010
    for _ in range(50):
        listed = await client.get(CONNECTIONS, headers=admin.headers)
        if connection_id not in connection_ids(listed):
            break
        await asyncio.sleep(0.05)
    assert connection_id not in connection_ids(listed)
    trail = await client.get(
        "/api/v1/audit/logs", headers=admin.headers, params={"action": "realtime.connection.kicked"}
    )
    assert [(e["target_id"], e["actor_user_id"]) for e in trail.json()["items"]] == [
        (connection_id, admin.user_id)
    ]


async def test_connection_admin_needs_org_admin(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    developer = await new_member(client, admin, "DEVELOPER")
    async with connected(live.ws, admin.access_token) as raw:
        listed = await client.get(CONNECTIONS, headers=admin.headers)
        (connection_id,) = connection_ids(listed)
        for account in (viewer, developer):
            assert (await client.get(CONNECTIONS, headers=account.headers)).status_code == 403
            kicked = await client.delete(f"{CONNECTIONS}/{connection_id}", headers=account.headers)
            assert kicked.status_code == 403
        await still_open(raw)


async def test_another_organisations_connection_is_not_found(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    stranger = await new_org_admin(client)
    async with raw_socket(live.ws) as raw:
        connection_id = (await raw.connect(admin.access_token))["connection_id"]
        assert connection_id not in connection_ids(
            await client.get(CONNECTIONS, headers=stranger.headers)
        )
        kicked = await client.delete(f"{CONNECTIONS}/{connection_id}", headers=stranger.headers)
        assert kicked.status_code == 404
        missing = await client.delete(f"{CONNECTIONS}/conn_doesnotexist", headers=admin.headers)
        assert missing.status_code == 404
        await still_open(raw)


async def test_node_shutdown_closes_clients_4500(servers: Servers) -> None:
    settings = make_settings(servers)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            admin = await new_org_admin(http)
        stack = AsyncExitStack()
        live = await stack.enter_async_context(serve_app(app, settings))
        try:
            async with connected(live.ws, admin.access_token) as raw:
                stopping = asyncio.create_task(stack.aclose())
                code, _ = await raw.closed()
                await stopping
        finally:
            await stack.aclose()
        assert code == 4500


# --- monitor channel -----------------------------------------------------------------------


def _monitor_event(event_type: str, connection_id: str) -> Callable[[dict[str, Any]], bool]:
    def match(frame: dict[str, Any]) -> bool:
        return (
            frame.get("op") == "event"
            and frame.get("type") == event_type
            and (frame.get("data") or {}).get("connection_id") == connection_id
        )

    return match


async def test_connections_appear_on_the_monitor_channel(
    client: httpx.AsyncClient, live: LiveServer
) -> None:
    admin = await new_org_admin(client)
    developer = await new_member(client, admin, "DEVELOPER")
    stranger = await new_org_admin(client)
    async with connected(live.ws, admin.access_token) as monitor:
        await monitor.subscribe("monitor")
        async with raw_socket(live.ws) as other:
            foreign_id = (await other.connect(stranger.access_token))["connection_id"]
        async with raw_socket(live.ws) as raw:
            connection_id = (await raw.connect(developer.access_token))["connection_id"]
        established = await until(monitor, _monitor_event("connection.established", connection_id))
        disconnected = await until(
            monitor, _monitor_event("connection.disconnected", connection_id)
        )
        assert established["channel"] == "monitor"
        assert disconnected["channel"] == "monitor"
        assert established["offset"] != disconnected["offset"]
        # Nothing of another organisation's connections.
        assert not [
            f
            for f in monitor.frames
            if f.get("op") == "event" and (f.get("data") or {}).get("connection_id") == foreign_id
        ]


async def test_monitor_channel_needs_org_admin(client: httpx.AsyncClient, live: LiveServer) -> None:
    admin = await new_org_admin(client)
    developer = await new_member(client, admin, "DEVELOPER")
    async with connected(live.ws, developer.access_token) as raw:
        assert await error_code(raw, "subscribe", channel="monitor") == "forbidden"


async def test_cors_answers_only_listed_origins(servers: Servers) -> None:
    async with node(servers, server={"allowed_origins": ["https://app.example"]}) as n:
        preflight = {"Access-Control-Request-Method": "GET"}
        listed = await n.http.options(
            "/api/v1/auth/profile", headers={"Origin": "https://app.example", **preflight}
        )
        assert listed.headers["access-control-allow-origin"] == "https://app.example"
        other = await n.http.options(
            "/api/v1/auth/profile", headers={"Origin": "https://evil.example", **preflight}
        )
        assert "access-control-allow-origin" not in other.headers

"""A revoked credential ends what it opened, on every node: WebSocket connections close with
4001 after a `disconnect` saying why, SSE streams end. Revoking an API key, logging out
(the session) and suspending an organisation are the three revocations."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.identity.runtime import IdentityRuntime
from tests.conftest import LiveServer, Servers, running_node
from tests.identity.factories import (
    Account,
    bearer,
    login,
    new_api_key,
    new_org_admin,
    new_super_admin,
)
from tests.realtime.raw import Raw, connected, raw_socket
from tests.realtime.test_read_pause import KeyLocks, key_locks
from tests.realtime.test_sse import sse

Node = tuple[httpx.AsyncClient, LiveServer]
REVOKED = {"op": "disconnect", "code": 4001, "reason": "credential revoked", "reconnect": False}


@pytest.fixture
async def nodes(servers: Servers) -> AsyncIterator[list[Node]]:
    """Two nodes on one PostgreSQL and Redis, each on a real socket."""
    async with AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_node(servers, node_id=name))
            for name in ("node-a", "node-b")
        ]


async def _revoked(raw: Raw) -> None:
    code, _ = await raw.closed()
    assert code == 4001
    assert REVOKED in raw.frames  # told why before the close


async def _revoke_key(http: httpx.AsyncClient, admin: Account, key_id: str) -> None:
    revoked = await http.delete(f"/api/v1/admin/api-keys/{key_id}", headers=admin.headers)
    assert revoked.status_code == 204


async def _still_open(raw: Raw, channel: str) -> None:
    assert (await raw.subscribe(channel))["channel"] == channel


async def test_a_revoked_api_keys_connections_close_on_every_node(nodes: list[Node]) -> None:
    (http_a, live_a), (_, live_b) = nodes
    admin = await new_org_admin(http_a)
    created = await new_api_key(http_a, admin, role="DEVELOPER")
    other = await new_api_key(http_a, admin, role="DEVELOPER")
    async with (
        connected(live_a.ws, created["key"]) as on_a,
        connected(live_b.ws, created["key"]) as on_b,
        connected(live_b.ws, other["key"]) as untouched,
        connected(live_b.ws, admin.access_token) as user,
    ):
        await _revoke_key(http_a, admin, created["id"])
        await _revoked(on_a)  # the revoking node
        await _revoked(on_b)  # the other, once announced
        await _still_open(untouched, "room:after")
        await _still_open(user, "room:after")


async def test_a_logout_closes_that_sessions_connections_only(nodes: list[Node]) -> None:
    (http_a, _), (_, live_b) = nodes
    admin = await new_org_admin(http_a)
    second = await login(http_a, admin.email)  # the same user, another session
    base = f"http://127.0.0.1:{live_b.port}"
    async with (
        connected(live_b.ws, admin.access_token) as first_session,
        connected(live_b.ws, second["access_token"]) as second_session,
        sse(base, ["room:logout"], token=admin.access_token) as first_stream,
    ):
        logout = await http_a.post("/api/v1/auth/logout", headers=admin.headers)
        assert logout.status_code == 204
        await _revoked(first_session)
        with pytest.raises(AssertionError, match="the stream ended"):
            await first_stream.item(within=5.0)
        await _still_open(second_session, "room:after")


async def test_a_suspended_organisations_connections_close(nodes: list[Node]) -> None:
    (http_a, live_a), (_, live_b) = nodes
    app: Any = live_a.app
    runtime: IdentityRuntime = app.state.identity
    suspended = await new_org_admin(http_a)
    key = (await new_api_key(http_a, suspended, role="DEVELOPER"))["key"]
    home = await new_org_admin(http_a)
    root = await new_super_admin(http_a, runtime)
    operator = (await login(http_a, root["user"]["email"], organization_slug=home.org_slug))[
        "access_token"
    ]
    async with (
        connected(live_b.ws, suspended.access_token) as member,
        connected(live_b.ws, key) as service,
        connected(live_b.ws, home.access_token) as elsewhere,
    ):
        path = f"/api/v1/admin/organizations/{suspended.org_id}/suspend"
        assert (await http_a.post(path, headers=bearer(operator))).status_code == 200
        await _revoked(member)
        await _revoked(service)
        await _still_open(elsewhere, "room:after")


async def test_a_revoked_api_keys_sse_stream_ends(nodes: list[Node]) -> None:
    (http_a, _), (_, live_b) = nodes
    admin = await new_org_admin(http_a)
    created = await new_api_key(http_a, admin, role="DEVELOPER")
    base = f"http://127.0.0.1:{live_b.port}"
    async with (
        sse(base, ["room:sse-revoked"], token=created["key"]) as revoked_stream,
        sse(base, ["room:sse-revoked"], token=admin.access_token) as kept_stream,
    ):
        await _revoke_key(http_a, admin, created["id"])
        with pytest.raises(AssertionError, match="the stream ended"):
            await revoked_stream.item(within=5.0)
        with pytest.raises(AssertionError, match="SSE answered 401"):  # the browser's retry
            async with sse(base, ["room:sse-revoked"], token=created["key"]):
                pass
        published = await http_a.post(
            "/api/v1/apix/channels/room:sse-revoked/events",
            headers=admin.headers,
            json={"type": "after.revoke", "data": {}},
        )
        assert published.status_code == 201
        (event,) = await kept_stream.events(1)
        assert event["event"] == "after.revoke"


@pytest.mark.parametrize("credential", ["session", "api_key"])
async def test_a_node_that_missed_a_revocation_closes_its_connection_once_it_hears_again(
    nodes: list[Node], credential: str
) -> None:
    """Logging out (the session) or revoking an API key while node B hears nothing: B
    closes the connection when it loads its copy again, which names both."""
    (http_a, _), (_, live_b) = nodes
    app_b: Any = live_b.app
    revocations = app_b.state.identity.revocations
    admin = await new_org_admin(http_a)
    kept = await new_api_key(http_a, admin, role="DEVELOPER")
    if credential == "session":
        token = admin.access_token
    else:
        key = await new_api_key(http_a, admin, role="DEVELOPER")
        token = key["key"]
    async with (
        connected(live_b.ws, token) as on_b,
        connected(live_b.ws, kept["key"]) as untouched,
    ):
        await revocations.stop()  # node B misses the announcement
        if credential == "session":
            logout = await http_a.post("/api/v1/auth/logout", headers=admin.headers)
            assert logout.status_code == 204
        else:
            await _revoke_key(http_a, admin, key["id"])
        await _still_open(on_b, "room:deaf")
        revocations.start()  # loads the copy, which holds the revocation
        await _revoked(on_b)
        await _still_open(untouched, "room:after")


# --- revoked while being checked: refused as it joins ------------------------------------


@dataclass
class SlowKey:
    """A node whose API-key reads wait on a lock of the `api_key` table (its copy of the
    revocations stopped, so every key is read from PostgreSQL), and a key of it whose next
    check will wait there: its revocation can be heard while it is being checked."""

    live: LiveServer
    locks: KeyLocks
    key: dict[str, Any]

    async def revoked_while_checked(self) -> None:
        """Once the key's check waits on the lock: its revocation is heard (the listener
        the announcement reaches), then the check goes on."""
        await self.locks.waiting(1)
        app: Any = self.live.app
        app.state.gateway.revoked("api_key", [uuid.UUID(self.key["id"])])
        await self.locks.release()


@pytest.fixture
async def slow_key(servers: Servers, owner_engine: AsyncEngine) -> AsyncIterator[SlowKey]:
    async with running_node(servers, node_id="node-slow") as (http, live):
        app: Any = live.app
        await app.state.identity.revocations.stop()
        admin = await new_org_admin(http)
        key = await new_api_key(http, admin, role="DEVELOPER")
        async with key_locks(owner_engine) as locks:
            await asyncio.wait_for(await locks.take(), 5)
            yield SlowKey(live, locks, key)


async def test_a_connect_whose_key_is_revoked_while_it_is_checked_is_refused(
    slow_key: SlowKey,
) -> None:
    async with raw_socket(slow_key.live.ws) as raw:
        client = {"type": "API_CLIENT", "name": "race"}
        token = slow_key.key["key"]
        reply = asyncio.create_task(raw.command("connect", token=token, client=client))
        await slow_key.revoked_while_checked()
        refused = await reply
        assert not refused["ok"]
        assert refused["error"]["code"] == "unauthorized"
        code, _ = await raw.closed()
        assert code == 4001


async def test_an_sse_stream_whose_key_is_revoked_while_it_is_checked_ends(
    slow_key: SlowKey,
) -> None:
    async def stream() -> None:
        base = f"http://127.0.0.1:{slow_key.live.port}"
        async with sse(base, ["room:race"], token=slow_key.key["key"]) as opened:
            with pytest.raises(AssertionError, match="the stream ended"):
                await opened.item(within=5.0)

    reading = asyncio.create_task(stream())
    await slow_key.revoked_while_checked()
    await reading

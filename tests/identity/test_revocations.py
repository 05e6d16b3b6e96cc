"""Revocations across nodes: each node checks a copy kept current by Redis announcements,
and asks Redis whenever that copy is not known to be current."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from apix.app import create_app
from apix.identity.revocations import Revocations
from apix.identity.runtime import IdentityRuntime
from tests.conftest import Servers, make_settings
from tests.identity.factories import (
    bearer,
    login,
    new_api_key,
    new_org_admin,
    new_super_admin,
)

PROFILE = "/api/v1/auth/profile"


@pytest.fixture
async def nodes(servers: Servers) -> AsyncIterator[list[tuple[Any, httpx.AsyncClient]]]:
    """Two nodes on the same PostgreSQL and Redis, each with its own HTTP client."""
    async with AsyncExitStack() as stack:
        pairs = []
        for name in ("node-a", "node-b"):
            app = create_app(make_settings(servers, node_id=name))
            await stack.enter_async_context(app.router.lifespan_context(app))
            transport = httpx.ASGITransport(app=app)
            client = httpx.AsyncClient(transport=transport, base_url="http://apix.test")
            pairs.append((app, await stack.enter_async_context(client)))
        for app, _ in pairs:
            await _until_current(app.state.identity.revocations)
        yield pairs


async def _until_current(revocations: Revocations, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not revocations.current:
        assert time.monotonic() < deadline, "the copy of the revocations never became current"
        await asyncio.sleep(0.02)


async def _status(client: httpx.AsyncClient, token: str, path: str = PROFILE) -> int:
    return (await client.get(path, headers=bearer(token))).status_code


async def _refused_within(
    client: httpx.AsyncClient, token: str, seconds: float, path: str = PROFILE
) -> float:
    started = time.monotonic()
    while (status := await _status(client, token, path)) != 401:
        assert status == 200
        assert time.monotonic() - started < seconds, "still accepted"
        await asyncio.sleep(0.005)
    return time.monotonic() - started


async def test_a_logout_on_one_node_is_refused_on_the_other_from_its_copy(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    (_, on_a), (app_b, on_b) = nodes
    admin = await new_org_admin(on_a)
    assert await _status(on_b, admin.access_token) == 200
    assert (await on_a.post("/api/v1/auth/logout", headers=admin.headers)).status_code == 204
    assert await _status(on_a, admin.access_token) == 401  # the revoking node: at once
    await _refused_within(on_b, admin.access_token, 1.0)  # the other: once announced
    assert app_b.state.identity.revocations.current  # answered from the copy


async def test_a_suspension_and_reactivation_reach_the_other_node(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    (app_a, on_a), (_, on_b) = nodes
    runtime: IdentityRuntime = app_a.state.identity
    admin = await new_org_admin(on_a)
    home = await new_org_admin(on_a)
    root = await new_super_admin(on_a, runtime)
    operator = (await login(on_a, root["user"]["email"], organization_slug=home.org_slug))[
        "access_token"
    ]
    suspend = f"/api/v1/admin/organizations/{admin.org_id}"
    assert (await on_a.post(f"{suspend}/suspend", headers=bearer(operator))).status_code == 200
    await _refused_within(on_b, admin.access_token, 1.0)
    assert await _status(on_b, home.access_token) == 200  # only that organisation
    assert (await on_a.post(f"{suspend}/reactivate", headers=bearer(operator))).status_code == 200
    deadline = time.monotonic() + 1.0
    while await _status(on_b, admin.access_token) != 200:
        assert time.monotonic() < deadline, "still refused after the reactivation"
        await asyncio.sleep(0.005)


async def test_without_a_current_copy_a_node_asks_redis(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    """A node that cannot hear announcements (its watcher stopped) still refuses a revoked
    token at once; started again, it loads what it missed."""
    (_, on_a), (app_b, on_b) = nodes
    revocations: Revocations = app_b.state.identity.revocations
    admin = await new_org_admin(on_a)
    other = await login(on_a, admin.email)
    assert await _status(on_b, admin.access_token) == 200

    await revocations.stop()
    assert not revocations.current
    assert (await on_a.post("/api/v1/auth/logout", headers=admin.headers)).status_code == 204
    assert await _status(on_b, admin.access_token) == 401
    assert await _status(on_b, other["access_token"]) == 200

    revocations.start()
    await _until_current(revocations)
    assert await _status(on_b, admin.access_token) == 401  # from the loaded copy
    assert await _status(on_b, other["access_token"]) == 200


# --- API keys: read once a minute per node, read again once revoked anywhere ------------

KEYS = "/api/v1/admin/api-keys"


@contextmanager
def api_key_reads(app: Any) -> Iterator[list[str]]:
    """The statements that look an API key up on this node's database while inside."""
    reads: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "api_key.token_hash = " in statement:
            reads.append(statement)

    engine = app.state.database.engine.sync_engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        yield reads
    finally:
        event.remove(engine, "before_cursor_execute", seen)


async def test_a_busy_api_key_is_read_from_postgresql_once(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    (app_a, on_a), _ = nodes
    admin = await new_org_admin(on_a)
    key = (await new_api_key(on_a, admin, role="DEVELOPER"))["key"]
    with api_key_reads(app_a) as reads:
        for _ in range(20):
            assert (await on_a.get(KEYS, headers=bearer(key))).status_code == 200
    assert len(reads) == 1


async def test_a_revoked_api_key_is_refused_on_every_node_that_kept_it(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    (_, on_a), (app_b, on_b) = nodes
    admin = await new_org_admin(on_a)
    created = await new_api_key(on_a, admin, role="DEVELOPER")
    key = created["key"]
    for client in (on_a, on_b):  # both nodes now keep it
        assert await _status(client, key, KEYS) == 200
    assert (await on_a.delete(f"{KEYS}/{created['id']}", headers=admin.headers)).status_code == 204
    assert await _status(on_a, key, KEYS) == 401  # the revoking node: at once
    await _refused_within(on_b, key, 1.0, KEYS)  # the other: once announced
    assert app_b.state.identity.revocations.current


async def test_a_node_that_cannot_hear_announcements_reads_the_key_again(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    (_, on_a), (app_b, on_b) = nodes
    revocations: Revocations = app_b.state.identity.revocations
    admin = await new_org_admin(on_a)
    created = await new_api_key(on_a, admin, role="DEVELOPER")
    assert (await on_b.get(KEYS, headers=bearer(created["key"]))).status_code == 200

    await revocations.stop()  # the announcement below is missed
    assert (await on_a.delete(f"{KEYS}/{created['id']}", headers=admin.headers)).status_code == 204
    assert (await on_b.get(KEYS, headers=bearer(created["key"]))).status_code == 401
    revocations.start()
    await _until_current(revocations)
    assert (await on_b.get(KEYS, headers=bearer(created["key"]))).status_code == 401


async def test_a_kept_api_key_expires_on_time(
    nodes: list[tuple[Any, httpx.AsyncClient]],
) -> None:
    (app_a, on_a), _ = nodes
    admin = await new_org_admin(on_a)
    expires = datetime.now(UTC) + timedelta(seconds=2.5)  # room for a loaded machine
    key = (await new_api_key(on_a, admin, role="DEVELOPER", expires_at=expires.isoformat()))["key"]
    with api_key_reads(app_a) as reads:
        assert (await on_a.get(KEYS, headers=bearer(key))).status_code == 200
        await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.05)
        refused = await on_a.get(KEYS, headers=bearer(key))
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "token_expired"
    assert len(reads) == 1, reads  # refused from what the node kept

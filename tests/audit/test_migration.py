"""Migration 0007 links the rows written before the chain existed, and goes down cleanly."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from apix.audit.verify import verify
from apix.config import DatabaseSettings
from apix.infra import migrate
from apix.infra.database import Database, async_url
from tests.audit.helpers import SECRET
from tests.conftest import Servers


async def _admin(url: str, statement: str) -> None:
    engine = create_async_engine(async_url(url), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as conn:
            await conn.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture
async def scratch(servers: Servers) -> AsyncIterator[str]:
    """A database of its own (next to this worker's), dropped afterwards."""
    url = make_url(servers.database_url)
    name = f"{url.database}_audit_migration"
    await _admin(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await _admin(servers.database_url, f'CREATE DATABASE "{name}"')
    yield url.set(database=name).render_as_string(hide_password=False)
    await _admin(servers.database_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


async def _owner(url: str, statement: str, **params: Any) -> list[Any]:
    engine = create_async_engine(async_url(url), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            result = await conn.execute(text(statement), params)
            return list(result) if result.returns_rows else []
    finally:
        await engine.dispose()


async def test_rows_from_before_the_chain_are_linked(scratch: str) -> None:
    settings = DatabaseSettings()
    await asyncio.to_thread(migrate.upgrade, scratch, settings, "0006")
    a, b = uuid.uuid4(), uuid.uuid4()
    chains: list[uuid.UUID | None] = [a, b, None]
    for minute in range(6):
        org = chains[minute % 3]
        await _owner(
            scratch,
            "INSERT INTO audit_log (id, org_id, action, outcome, details, created_at) VALUES "
            "(gen_random_uuid(), :org, :action, 'success', CAST(:details AS jsonb), "
            "now() - make_interval(mins => :ago))",
            org=org,
            action=f"legacy.e{minute}",
            details='{"ünïcode": "✓", "n": 1.5, "nested": {"b": [1, null]}}',
            ago=60 - minute,
        )
    await asyncio.to_thread(migrate.upgrade, scratch, settings, "0007")

    rows = await _owner(scratch, "SELECT org_id, seq, action FROM audit_log ORDER BY action")
    assert [(r.org_id, r.seq) for r in rows] == [
        (a, 1), (b, 1), (None, 1), (a, 2), (b, 2), (None, 2)
    ]  # fmt: skip
    database = Database(scratch, settings)
    try:
        for org in chains:
            report = await verify(database, org, SECRET)
            assert report["ok"], report
            assert report["checked"] == 2
        # New rows continue each chain.
        async with database.transaction(a) as uow:
            await uow.session.execute(
                text(
                    "INSERT INTO audit_log (id, org_id, action, outcome, details) "
                    "VALUES (gen_random_uuid(), :org, 'new', 'success', '{}')"
                ),
                {"org": a},
            )
        assert (await verify(database, a, SECRET))["last_seq"] == 3
    finally:
        await database.dispose()

    await asyncio.to_thread(migrate.downgrade, scratch, "0006")
    columns = await _owner(
        scratch,
        "SELECT column_name FROM information_schema.columns WHERE table_name = 'audit_log'",
    )
    assert {"seq", "hash", "prev_hash", "source"}.isdisjoint({c[0] for c in columns})
    assert len(await _owner(scratch, "SELECT id FROM audit_log")) == 7

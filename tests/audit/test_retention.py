"""Retention: expired rows go, a signed checkpoint stays, and the chain still verifies."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.audit import chain
from apix.audit.errors import ChainBroken
from apix.audit.retention import prune
from apix.audit.verify import verify
from apix.config import Settings
from apix.core.json import dumps
from apix.identity.runtime import IdentityRuntime
from apix.infra.database import Database
from tests.audit.helpers import SECRET, chain_rows, record_many, tamper
from tests.identity.factories import new_org_admin

LATER = datetime.now(UTC) + timedelta(days=400)


@pytest.fixture
def database(runtime: IdentityRuntime) -> Database:
    return runtime.database


async def _events(database: Database, org: uuid.UUID | None, n: int) -> None:
    for i in range(n):  # one transaction each: distinct times
        await record_many(database, org, [{"action": f"e.n{i}"}])


async def _verify(database: Database, org: uuid.UUID | None) -> dict[str, Any]:
    return await verify(database, org, SECRET)


async def test_pruning_everything_leaves_a_checkpoint_the_chain_verifies_from(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await _events(database, org, 4)
    before = await chain_rows(owner_engine, org)
    result = await prune(database, org, SECRET, now=LATER)
    assert result["removed"] == 4
    assert result["through_seq"] == 4
    assert result["checkpoint_seq"] == 5
    rows = await chain_rows(owner_engine, org)
    assert [r["action"] for r in rows] == [chain.CHECKPOINT_ACTION]
    checkpoint = rows[0]
    assert checkpoint["source"] == "system"
    assert checkpoint["details"]["through_hash"] == before[-1]["hash"]
    assert checkpoint["prev_hash"] == before[-1]["hash"]
    report = await _verify(database, org)
    assert report["ok"], report
    assert report["checkpoint_seq"] == 4
    assert report["first_seq"] == 5
    # The chain goes on from the checkpoint.
    await _events(database, org, 2)
    assert (await _verify(database, org))["last_seq"] == 7


async def test_only_the_expired_prefix_is_removed(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await _events(database, org, 5)
    rows = await chain_rows(owner_engine, org)
    # Rows 1-3 are older than the retention as of this moment; 4 and 5 are not.
    now = rows[3]["created_at"] + timedelta(days=365)
    result = await prune(database, org, SECRET, now=now)
    assert result["removed"] == 3
    assert result["retention_days"] == 365
    left = await chain_rows(owner_engine, org)
    assert [r["seq"] for r in left] == [4, 5, 6]
    report = await _verify(database, org)
    assert report["ok"], report
    assert (report["first_seq"], report["checkpoint_seq"], report["last_seq"]) == (4, 3, 6)
    # Nothing more to remove at the same moment.
    again = await prune(database, org, SECRET, now=now)
    assert again["removed"] == 0
    assert len(await chain_rows(owner_engine, org)) == 3


async def test_a_later_prune_removes_the_older_checkpoint_too(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await _events(database, org, 3)
    await prune(database, org, SECRET, now=LATER)
    await _events(database, org, 2)
    result = await prune(database, org, SECRET, now=LATER + timedelta(days=1))
    assert result["removed"] == 3  # the first checkpoint and the two events after it
    rows = await chain_rows(owner_engine, org)
    assert [r["seq"] for r in rows] == [7]
    report = await _verify(database, org)
    assert report["ok"], report
    assert report["checkpoint_seq"] == 6


async def test_the_platform_chain_is_pruned_too(database: Database) -> None:
    await _events(database, None, 2)
    result = await prune(database, None, SECRET, default_days=30, now=LATER)
    assert result["removed"] >= 2
    assert (await _verify(database, None))["ok"]


async def test_an_organisations_own_retention_is_used(
    database: Database, client: httpx.AsyncClient, settings: Settings
) -> None:
    node_secret = settings.secret_key.get_secret_value().encode()
    short, default = await new_org_admin(client), await new_org_admin(client)
    response = await client.put(
        "/api/v1/audit/retention", headers=short.headers, json={"retention_days": 10}
    )
    assert response.status_code == 200, response.text
    soon = datetime.now(UTC) + timedelta(days=11)
    cut = await prune(database, uuid.UUID(short.org_id), node_secret, now=soon)
    kept = await prune(database, uuid.UUID(default.org_id), node_secret, now=soon)
    assert cut["retention_days"] == 10
    assert cut["removed"] >= 3  # registration, login, retention change
    assert kept["retention_days"] == 365
    assert kept["removed"] == 0
    verdict = (await client.get("/api/v1/audit/verify", headers=short.headers)).json()
    assert verdict["ok"] is True, verdict
    assert verdict["checkpoint_seq"] == cut["through_seq"]


async def test_a_broken_chain_is_not_pruned(database: Database, owner_engine: AsyncEngine) -> None:
    org = uuid.uuid4()
    await _events(database, org, 3)
    rows = await chain_rows(owner_engine, org)
    await tamper(owner_engine, org, rows[1]["id"], "action", "rewritten")
    with pytest.raises(ChainBroken) as caught:
        await prune(database, org, SECRET, now=LATER)
    assert caught.value.details["seq"] == 2
    assert len(await chain_rows(owner_engine, org)) == 3


async def test_a_checkpoint_signed_with_another_key_does_not_verify(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await _events(database, org, 2)
    await prune(database, org, b"some other key", now=LATER)
    report = await _verify(database, org)
    assert not report["ok"]
    assert report["broken"]["seq"] == 3
    assert "signature" in report["broken"]["reason"]


async def test_an_altered_checkpoint_is_found_at_the_checkpoint(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await _events(database, org, 3)
    rows = await chain_rows(owner_engine, org)
    await prune(database, org, SECRET, now=rows[2]["created_at"] + timedelta(days=365))
    await _events(database, org, 2)
    checkpoint = next(
        r for r in await chain_rows(owner_engine, org) if r["action"] == chain.CHECKPOINT_ACTION
    )
    forged = {**checkpoint["details"], "through_hash": "0" * 64}
    await tamper(owner_engine, org, checkpoint["id"], "details", dumps(forged).decode())
    report = await _verify(database, org)
    assert report["broken"]["seq"] == checkpoint["seq"]
    assert report["broken"]["id"] == checkpoint["id"]


async def test_the_application_role_cannot_delete_without_a_checkpoint(
    database: Database, owner_engine: AsyncEngine
) -> None:
    org = uuid.uuid4()
    await _events(database, org, 3)
    with pytest.raises(DBAPIError, match="no checkpoint covers row 2"):
        async with database.transaction(org) as uow:
            await uow.session.execute(text("SELECT apix_audit_prune(:org, 2)"), {"org": org})
    # A checkpoint row recorded by an integration is not one.
    async with database.transaction(org) as uow:
        rows = await chain_rows(owner_engine, org)
        await uow.session.execute(
            text(
                "INSERT INTO audit_log (id, org_id, action, outcome, source, details) VALUES "
                "(gen_random_uuid(), :org, 'audit.checkpoint', 'success', 'integration', "
                "CAST(:details AS jsonb))"
            ),
            {"org": org, "details": f'{{"through_seq": 2, "through_hash": "{rows[1]["hash"]}"}}'},
        )
    with pytest.raises(DBAPIError, match="no checkpoint covers row 2"):
        async with database.transaction(org) as uow:
            await uow.session.execute(text("SELECT apix_audit_prune(:org, 2)"), {"org": org})
    assert len(await chain_rows(owner_engine, org)) == 4


async def test_another_tenants_rows_cannot_be_pruned(
    database: Database, owner_engine: AsyncEngine
) -> None:
    mine, theirs = uuid.uuid4(), uuid.uuid4()
    await _events(database, theirs, 2)
    with pytest.raises(DBAPIError, match="not scoped to that chain"):
        async with database.transaction(mine) as uow:
            await uow.session.execute(text("SELECT apix_audit_prune(:org, 1)"), {"org": theirs})
    assert len(await chain_rows(owner_engine, theirs)) == 2

"""Tenant isolation at the database: row-level security as the application role.

Rows of two organisations are made through the API; the queries here then run as the
application role (no superuser, no BYPASSRLS) with no filter of their own, so only the
policies stand between one tenant and another's rows.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.config import Settings
from apix.core.security import token_hash
from apix.identity.runtime import IdentityRuntime
from apix.infra.database import Base, Database
from apix.models import load_all_models
from tests.identity.factories import Account, new_api_key, new_member, new_org_admin, unique

TENANT_TABLES = ("membership", "api_key", "invitation", "audit_log")
# Tenant tables the application may change (the audit log is append-only).
MUTABLE_TENANT_TABLES = ("membership", "api_key", "invitation")


@dataclass
class Org:
    id: uuid.UUID
    admin: Account
    member: Account
    api_key: dict[str, Any]
    invitation_id: str


@dataclass
class Seeded:
    a: Org
    b: Org


async def _org(client: httpx.AsyncClient) -> Org:
    admin = await new_org_admin(client)
    member = await new_member(client, admin, "VIEWER")
    invitation = await client.post(
        "/api/v1/admin/invitations",
        headers=admin.headers,
        json={"email": f"{unique('invitee')}@example.com", "role": "VIEWER"},
    )
    assert invitation.status_code == 201, invitation.text
    return Org(
        id=uuid.UUID(admin.org_id),
        admin=admin,
        member=member,
        api_key=await new_api_key(client, admin, role="VIEWER"),
        invitation_id=invitation.json()["id"],
    )


@pytest.fixture
async def seeded(client: httpx.AsyncClient) -> Seeded:
    """Two organisations with rows in every tenant table, and one platform audit row."""
    seeded = Seeded(a=await _org(client), b=await _org(client))
    # A failed login for an unknown email: an audit row of no organisation.
    failed = await client.post(
        "/api/v1/auth/login",
        json={"email": f"{unique('nobody')}@example.com", "password": "wrong password"},
    )
    assert failed.status_code == 401, failed.text
    return seeded


@pytest.fixture
async def one_org(client: httpx.AsyncClient) -> uuid.UUID:
    """One organisation (its registration and login are in its audit trail)."""
    return uuid.UUID((await new_org_admin(client)).org_id)


@pytest.fixture
def database(runtime: IdentityRuntime) -> Database:
    """The application's own runtime database (application role)."""
    return runtime.database


async def _scalar(db: Database, org: uuid.UUID | None, sql: str, **params: Any) -> Any:
    async with db.transaction(org) as uow:
        return (await uow.session.execute(text(sql), params)).scalar_one()


async def _org_ids(db: Database, org: uuid.UUID | None, table: str) -> set[uuid.UUID | None]:
    async with db.transaction(org) as uow:
        rows = await uow.session.execute(text(f"SELECT DISTINCT org_id FROM {table}"))  # noqa: S608
        return {row[0] for row in rows}


async def test_the_runtime_database_is_the_application_role(database: Database) -> None:
    async with database.transaction(uuid.uuid4()) as uow:
        row = (
            await uow.session.execute(
                text(
                    "SELECT current_user, rolsuper, rolbypassrls FROM pg_roles "
                    "WHERE rolname = current_user"
                )
            )
        ).one()
    assert tuple(row) == ("apix_app", False, False)


# --- reads ------------------------------------------------------------------------------


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_reads_see_only_the_current_tenants_rows(
    database: Database, seeded: Seeded, table: str
) -> None:
    a, b = seeded.a.id, seeded.b.id
    # The rows exist, and each tenant sees exactly its own.
    assert await _org_ids(database, a, table) == {a}
    assert await _org_ids(database, b, table) == {b}
    # Even when asked for the other's rows by name.
    sql = f"SELECT count(*) FROM {table} WHERE org_id = :other"  # noqa: S608
    assert await _scalar(database, b, sql, other=a) == 0
    assert await _scalar(database, a, sql, other=b) == 0

    # No tenant set: no tenant's rows at all.
    async with database.transaction() as uow:
        setting = await uow.session.execute(text("SELECT current_setting('apix.org_id', true)"))
        assert setting.scalar_one() in (None, "")
        tenant_rows = await uow.session.execute(
            text(f"SELECT count(*) FROM {table} WHERE org_id IS NOT NULL")  # noqa: S608
        )
        assert tenant_rows.scalar_one() == 0
    if table == "audit_log":
        # Platform events (no organisation) are what a transaction without a tenant sees.
        assert await _org_ids(database, None, table) == {None}
    else:
        assert await _scalar(database, None, f"SELECT count(*) FROM {table}") == 0  # noqa: S608


async def test_a_tenant_does_not_see_another_tenants_rows_by_their_ids(
    database: Database, seeded: Seeded
) -> None:
    a, b = seeded.a, seeded.b
    probes = [
        ("api_key", "id", b.api_key["id"], a.api_key["id"]),
        ("invitation", "id", b.invitation_id, a.invitation_id),
        ("membership", "user_id", b.member.user_id, a.member.user_id),
    ]
    for table, column, theirs, ours in probes:
        sql = f"SELECT count(*) FROM {table} WHERE {column} = CAST(:id AS uuid)"  # noqa: S608
        assert await _scalar(database, a.id, sql, id=theirs) == 0, table
        assert await _scalar(database, a.id, sql, id=ours) == 1, table


async def test_a_token_lookup_admits_exactly_the_one_row_it_names(
    database: Database, seeded: Seeded
) -> None:
    """`apix.lookup_hash` (API key authentication) opens one row, never the whole table."""
    digest = token_hash(seeded.b.api_key["key"])
    async with database.transaction(seeded.a.id) as uow:
        await uow.session.execute(
            text("SELECT set_config('apix.lookup_hash', :h, true)"), {"h": digest}
        )
        rows = (await uow.session.execute(text("SELECT id, org_id FROM api_key"))).all()
        other_ids = {r.id for r in rows if r.org_id == seeded.b.id}
        assert other_ids == {uuid.UUID(seeded.b.api_key["id"])}
        invitations = await uow.session.execute(
            text("SELECT count(*) FROM invitation WHERE org_id = :b"), {"b": seeded.b.id}
        )
        assert invitations.scalar_one() == 0
    for lookup in ("", "0" * 64):
        async with database.transaction() as uow:
            await uow.session.execute(
                text("SELECT set_config('apix.lookup_hash', :h, true)"), {"h": lookup}
            )
            keys = await uow.session.execute(text("SELECT count(*) FROM api_key"))
            assert keys.scalar_one() == 0


# --- writes -----------------------------------------------------------------------------


def _insert(table: str) -> str:
    """An INSERT of one valid row into ``table`` for organisation ``:org``."""
    return {
        "membership": "INSERT INTO membership (id, org_id, user_id, role) "
        "VALUES (gen_random_uuid(), :org, :user, 'VIEWER')",
        "api_key": "INSERT INTO api_key (id, org_id, name, prefix, token_hash) "
        "VALUES (gen_random_uuid(), :org, 'probe', 'apx_probe', md5(random()::text))",
        "invitation": "INSERT INTO invitation (id, org_id, email, role, token_hash, expires_at) "
        "VALUES (gen_random_uuid(), :org, 'probe@example.com', 'VIEWER', md5(random()::text), "
        "now() + interval '1 day')",
        "audit_log": "INSERT INTO audit_log (id, org_id, action, outcome, details) "
        "VALUES (gen_random_uuid(), :org, 'probe', 'success', '{}')",
    }[table]


@pytest.mark.parametrize("table", TENANT_TABLES)
async def test_inserting_a_row_for_another_tenant_fails(
    database: Database, seeded: Seeded, table: str
) -> None:
    a, b = seeded.a, seeded.b
    # A user in neither of the target memberships yet, so only the policy can refuse.
    params = {"user": uuid.UUID(a.admin.user_id)}
    count_b = f"SELECT count(*) FROM {table}"  # noqa: S608
    before = await _scalar(database, b.id, count_b)
    for tenant in (a.id, None):
        with pytest.raises(DBAPIError, match="row-level security"):
            async with database.transaction(tenant) as uow:
                await uow.session.execute(text(_insert(table)), {**params, "org": b.id})
    assert await _scalar(database, b.id, count_b) == before
    # The same statement for the tenant's own organisation is accepted.
    async with database.transaction(b.id) as uow:
        await uow.session.execute(text(_insert(table)), {**params, "org": b.id})
    assert await _scalar(database, b.id, count_b) == before + 1


@pytest.mark.parametrize("table", MUTABLE_TENANT_TABLES)
async def test_a_tenant_cannot_move_change_or_delete_another_tenants_rows(
    database: Database, seeded: Seeded, table: str
) -> None:
    a, b = seeded.a.id, seeded.b.id
    count = f"SELECT count(*) FROM {table}"  # noqa: S608
    a_before, b_before = await _scalar(database, a, count), await _scalar(database, b, count)
    # Moving its own rows into B violates the policy's WITH CHECK.
    with pytest.raises(DBAPIError, match="row-level security"):
        async with database.transaction(a) as uow:
            await uow.session.execute(text(f"UPDATE {table} SET org_id = :b"), {"b": b})  # noqa: S608
    # B's rows are invisible to A's UPDATE and DELETE.
    async with database.transaction(a) as uow:
        updated = await uow.session.execute(
            text(f"UPDATE {table} SET created_at = created_at WHERE org_id = :b"),  # noqa: S608
            {"b": b},
        )
        deleted = await uow.session.execute(
            text(f"DELETE FROM {table} WHERE org_id = :b"),  # noqa: S608
            {"b": b},
        )
        assert updated.rowcount == 0  # type: ignore[attr-defined]
        assert deleted.rowcount == 0  # type: ignore[attr-defined]
    assert await _scalar(database, a, count) == a_before
    assert await _scalar(database, b, count) == b_before
    assert await _org_ids(database, b, table) == {b}


# --- pooled connections -----------------------------------------------------------------


class _Abort(Exception):
    """Raised inside a transaction to roll it back."""


@pytest.fixture
async def small_pool(settings: Settings) -> AsyncIterator[Database]:
    """The application role over two pooled connections, so tenants must share them."""
    db = Database(
        settings.database_url or "",
        settings.database.model_copy(update={"pool_size": 2, "max_overflow": 0}),
    )
    yield db
    await db.dispose()


async def test_a_pooled_connection_never_carries_a_tenant_into_another_transaction(
    small_pool: Database, seeded: Seeded
) -> None:
    a, b = seeded.a.id, seeded.b.id
    tenants: list[uuid.UUID | None] = [a, b, a, None, b]

    async def unit(i: int) -> tuple[int, uuid.UUID | None]:
        tenant = tenants[i % len(tenants)]
        abort = i % 7 == 3  # some transactions roll back instead of committing
        try:
            async with small_pool.transaction(tenant) as uow:
                session = uow.session
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                await asyncio.sleep(0)  # let other transactions in between
                setting = await session.execute(text("SELECT current_setting('apix.org_id', true)"))
                assert setting.scalar_one() in ((None, "") if tenant is None else (str(tenant),))
                for table in TENANT_TABLES:
                    rows = await session.execute(
                        text(f"SELECT DISTINCT org_id FROM {table}")  # noqa: S608
                    )
                    seen = {row[0] for row in rows} - {None}
                    expected = set() if tenant is None else {tenant}
                    assert seen == expected, f"#{i} ({tenant}) saw {seen} in {table}"
                    await asyncio.sleep(0)
                if abort:
                    raise _Abort
        except _Abort:
            pass
        return pid, tenant

    results = await asyncio.gather(*(unit(i) for i in range(200)), return_exceptions=True)

    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == [], failures[:3]
    served: dict[int, set[uuid.UUID | None]] = {}
    for pid, tenant in results:  # type: ignore[misc]
        served.setdefault(pid, set()).add(tenant)
    # Two connections served all 200 transactions, each of them for several tenants.
    assert 1 <= len(served) <= 2, served
    for tenants_served in served.values():
        assert {a, b} <= tenants_served


# --- the schema -------------------------------------------------------------------------


async def test_every_table_with_an_org_id_is_under_forced_row_level_security(
    owner_engine: AsyncEngine,
) -> None:
    load_all_models()
    tables = sorted(t.name for t in Base.metadata.tables.values() if "org_id" in t.c)
    assert set(TENANT_TABLES) <= set(tables)
    problems: list[str] = []
    async with owner_engine.connect() as conn:
        for name in tables:
            flags = (
                await conn.execute(
                    text(
                        "SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
                        "WHERE oid = to_regclass(:t)"
                    ),
                    {"t": name},
                )
            ).one_or_none()
            if flags is None:
                problems.append(f"{name}: missing from the database")
                continue
            enabled, forced = flags
            if not enabled:
                problems.append(f"{name}: row-level security is not enabled")
            if not forced:
                problems.append(f"{name}: row-level security is not forced")
            policies = (
                await conn.execute(
                    text(
                        "SELECT policyname FROM pg_policies WHERE schemaname = current_schema() "
                        "AND tablename = :t AND cmd = 'ALL' AND qual IS NOT NULL "
                        "AND with_check IS NOT NULL"
                    ),
                    {"t": name},
                )
            ).all()
            if not policies:
                problems.append(f"{name}: no policy with both USING and WITH CHECK")
    assert problems == [], "tables with org_id not isolated by RLS:\n" + "\n".join(problems)


# --- the audit log is append-only -------------------------------------------------------


async def test_the_application_role_can_append_to_and_read_the_audit_log(
    database: Database, one_org: uuid.UUID
) -> None:
    action = unique("probe")
    for tenant in (one_org, None):
        async with database.transaction(tenant) as uow:
            await uow.session.execute(
                text(
                    "INSERT INTO audit_log (id, org_id, action, outcome, details) "
                    "VALUES (gen_random_uuid(), :org, :action, 'success', '{}')"
                ),
                {"org": tenant, "action": action},
            )
        found = await _scalar(
            database, tenant, "SELECT count(*) FROM audit_log WHERE action = :a", a=action
        )
        # 1, not 2: the organisation's row and the platform row are each visible only to
        # their own scope.
        assert found == 1, tenant
    other = await _scalar(
        database, uuid.uuid4(), "SELECT count(*) FROM audit_log WHERE action = :a", a=action
    )
    assert other == 0


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE audit_log SET action = 'tampered'",
        "UPDATE audit_log SET details = '{}' WHERE false",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ],
    ids=["update", "update-nothing", "delete", "truncate"],
)
async def test_the_application_role_cannot_change_the_audit_log(
    database: Database, one_org: uuid.UUID, statement: str
) -> None:
    count = "SELECT count(*) FROM audit_log"
    before = {t: await _scalar(database, t, count) for t in (one_org, None)}
    assert before[one_org] > 0
    for tenant in (one_org, None):
        with pytest.raises(DBAPIError, match="permission denied"):
            async with database.transaction(tenant) as uow:
                await uow.session.execute(text(statement))
    assert {t: await _scalar(database, t, count) for t in before} == before
    tampered = await _scalar(
        database, one_org, "SELECT count(*) FROM audit_log WHERE action = 'tampered'"
    )
    assert tampered == 0

"""The runtime role cannot bypass row-level security; the transaction helper scopes and defers."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from apix.config import Settings
from apix.infra.database import Database


@pytest.fixture
async def database(settings: Settings) -> AsyncIterator[Database]:
    db = Database(settings.database_url or "", settings.database)
    yield db
    await db.dispose()


async def test_runtime_queries_run_as_a_role_that_cannot_bypass_rls(database: Database) -> None:
    async with database.transaction() as uow:
        row = (
            await uow.session.execute(
                text(
                    "SELECT current_user, r.rolsuper, r.rolbypassrls, "
                    "(SELECT count(*) FROM pg_class c WHERE c.relowner = r.oid "
                    " AND c.relnamespace = 'public'::regnamespace) "
                    "FROM pg_roles r WHERE r.rolname = current_user"
                )
            )
        ).one()
    user, superuser, bypass, owned = row
    assert user == "apix_app"
    assert superuser is False
    assert bypass is False
    assert owned == 0


@pytest.fixture
async def tenant_table(owner_engine: object) -> AsyncIterator[tuple[uuid.UUID, uuid.UUID]]:
    """A table with the same RLS policy shape every tenant table uses, and rows of two orgs."""
    org_a, org_b = uuid.uuid4(), uuid.uuid4()
    async with owner_engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.execute(text("CREATE TABLE rls_probe (org_id uuid NOT NULL, note text)"))
        await conn.execute(text("ALTER TABLE rls_probe ENABLE ROW LEVEL SECURITY"))
        await conn.execute(text("ALTER TABLE rls_probe FORCE ROW LEVEL SECURITY"))
        await conn.execute(
            text(
                "CREATE POLICY tenant ON rls_probe USING (org_id = apix_current_org()) "
                "WITH CHECK (org_id = apix_current_org())"
            )
        )
        await conn.execute(text("GRANT SELECT, INSERT, UPDATE, DELETE ON rls_probe TO apix_app"))
        await conn.execute(
            text("INSERT INTO rls_probe VALUES (:a, 'a1'), (:a, 'a2'), (:b, 'b1')"),
            {"a": org_a, "b": org_b},
        )
    yield org_a, org_b
    async with owner_engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.execute(text("DROP TABLE rls_probe"))


async def test_a_tenant_sees_only_its_rows_even_without_a_filter(
    database: Database, tenant_table: tuple[uuid.UUID, uuid.UUID]
) -> None:
    org_a, org_b = tenant_table
    async with database.transaction(org_a) as uow:
        notes = (
            await uow.session.execute(text("SELECT note FROM rls_probe ORDER BY note"))
        ).scalars()
        assert list(notes) == ["a1", "a2"]
    async with database.transaction(org_b) as uow:
        notes = (await uow.session.execute(text("SELECT note FROM rls_probe"))).scalars()
        assert list(notes) == ["b1"]
    async with database.transaction() as uow:
        count = (await uow.session.execute(text("SELECT count(*) FROM rls_probe"))).scalar_one()
        assert count == 0


async def test_a_tenant_cannot_write_another_tenants_rows(
    database: Database, tenant_table: tuple[uuid.UUID, uuid.UUID]
) -> None:
    org_a, org_b = tenant_table
    with pytest.raises(DBAPIError, match="row-level security"):
        async with database.transaction(org_a) as uow:
            await uow.session.execute(
                text("INSERT INTO rls_probe VALUES (:b, 'sneaky')"), {"b": org_b}
            )
    async with database.transaction(org_a) as uow:
        updated = await uow.session.execute(text("UPDATE rls_probe SET note = 'x'"))
        assert updated.rowcount == 2  # type: ignore[attr-defined]


async def test_the_tenant_setting_does_not_outlive_its_transaction(
    settings: Settings, tenant_table: tuple[uuid.UUID, uuid.UUID]
) -> None:
    org_a, _ = tenant_table
    one_connection = Database(
        settings.database_url or "",
        settings.database.model_copy(update={"pool_size": 1, "max_overflow": 0}),
    )
    try:
        async with one_connection.transaction(org_a) as uow:
            assert (
                await uow.session.execute(text("SELECT count(*) FROM rls_probe"))
            ).scalar_one() == 2
        async with one_connection.transaction() as uow:
            setting = await uow.session.execute(text("SELECT current_setting('apix.org_id', true)"))
            assert setting.scalar_one() in (None, "")
            assert (
                await uow.session.execute(text("SELECT count(*) FROM rls_probe"))
            ).scalar_one() == 0
    finally:
        await one_connection.dispose()


async def test_side_effects_run_only_after_commit(database: Database) -> None:
    released: list[str] = []

    async def record(name: str) -> None:
        released.append(name)

    async with database.transaction() as uow:
        uow.after_commit(lambda: record("committed"))
        assert released == []
    assert released == ["committed"]

    async def fail_after_scheduling() -> None:
        async with database.transaction() as uow:
            uow.after_commit(lambda: record("rolled back"))
            raise RuntimeError("abort")

    with pytest.raises(RuntimeError, match="abort"):
        await fail_after_scheduling()
    assert released == ["committed"]


async def test_a_failing_side_effect_does_not_undo_the_commit(
    database: Database, tenant_table: tuple[uuid.UUID, uuid.UUID]
) -> None:
    org_a, _ = tenant_table

    async def explode() -> None:
        raise ConnectionError("broker down")

    async with database.transaction(org_a) as uow:
        await uow.session.execute(text("INSERT INTO rls_probe VALUES (:a, 'kept')"), {"a": org_a})
        uow.after_commit(explode)
    async with database.transaction(org_a) as uow:
        notes = (await uow.session.execute(text("SELECT note FROM rls_probe"))).scalars()
        assert "kept" in list(notes)

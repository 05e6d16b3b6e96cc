"""Migrations and models agree, and the schema goes down and up again cleanly."""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

from apix.infra.database import Base
from apix.infra.migrate import include_object
from apix.models import load_all_models


async def test_models_match_the_migrated_schema(owner_engine: Any) -> None:
    load_all_models()
    async with owner_engine.connect() as conn:
        diff = await conn.run_sync(
            lambda sync: compare_metadata(
                MigrationContext.configure(sync, opts={"include_object": include_object}),
                Base.metadata,
            )
        )
    assert diff == []


async def test_every_table_is_created_by_the_migrations(owner_engine: Any) -> None:
    load_all_models()
    async with owner_engine.connect() as conn:
        tables = set(
            (
                await conn.execute(
                    text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalars()
        )
    assert set(Base.metadata.tables) <= tables

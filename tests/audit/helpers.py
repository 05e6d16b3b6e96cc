"""Helpers for audit tests: rows written as the application writes them, and tampering
done as the schema owner (the only role that can change a stored row)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.infra.database import Database

SECRET = b"test-secret-key-for-audit-checkpoints"


async def record_many(
    database: Database, org_id: uuid.UUID | None, events: Sequence[dict[str, Any]]
) -> None:
    """Record ``events`` (keyword arguments of `record`) in one transaction."""
    async with database.transaction(org_id) as uow:
        for event in events:
            await audit.record(uow, meta=RequestMeta(ip="203.0.113.7"), org_id=org_id, **event)


async def chain_rows(owner: AsyncEngine, org_id: uuid.UUID | None) -> list[dict[str, Any]]:
    """The chain's rows in order, read as the owner."""
    where = "org_id IS NULL" if org_id is None else "org_id = :org"
    async with owner.begin() as conn:
        await _tenant(conn, org_id)
        rows = await conn.execute(
            text(f"SELECT * FROM audit_log WHERE {where} ORDER BY seq"),  # noqa: S608
            {"org": org_id},
        )
        return [dict(r._mapping) for r in rows]


async def tamper(
    owner: AsyncEngine, org_id: uuid.UUID | None, row_id: uuid.UUID, column: str, value: Any
) -> None:
    """Change one stored field of one row, as someone with the owner's rights would."""
    cast = {"details": "CAST(:value AS jsonb)"}
    async with owner.begin() as conn:
        await _tenant(conn, org_id)
        result = await conn.execute(
            text(
                f"UPDATE audit_log SET {column} = {cast.get(column, ':value')} "  # noqa: S608
                "WHERE id = :id"
            ),
            {"value": value, "id": row_id},
        )
        assert result.rowcount == 1  # type: ignore[attr-defined]


async def delete_row(owner: AsyncEngine, org_id: uuid.UUID | None, row_id: uuid.UUID) -> None:
    async with owner.begin() as conn:
        await _tenant(conn, org_id)
        await conn.execute(text("DELETE FROM audit_log WHERE id = :id"), {"id": row_id})


async def _tenant(conn: Any, org_id: uuid.UUID | None) -> None:
    # The owner is under the forced policy too (unless it is a superuser).
    if org_id is not None:
        await conn.execute(
            text("SELECT set_config('apix.org_id', :org, true)"), {"org": str(org_id)}
        )

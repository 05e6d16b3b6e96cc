"""Walk an audit chain and report its first broken link.

Each row's hash is recomputed here from the stored fields (`apix.audit.chain`), not taken
from the database's own function; links, sequence gaps and checkpoint signatures are
checked in order, so the first finding is the earliest row that no longer verifies.
"""

from __future__ import annotations

import hmac
import uuid
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import Text, cast, select
from sqlalchemy.ext.asyncio import AsyncSession

from apix.audit import chain
from apix.audit.models import AuditLog
from apix.audit.service import in_chain
from apix.core.json import loads
from apix.infra.database import Database

_BATCH = 1000
_Row = dict[str, Any]
_FIELDS = [getattr(AuditLog, name) for name in chain.HASHED_FIELDS if name != "details"]


async def verify(database: Database, org_id: uuid.UUID | None, secret: bytes) -> dict[str, Any]:
    """Verify ``org_id``'s chain (the platform's when None), in a transaction of its own."""
    async with database.transaction(org_id) as uow:
        return await verify_in(uow.session, org_id, secret)


async def verify_in(
    session: AsyncSession, org_id: uuid.UUID | None, secret: bytes
) -> dict[str, Any]:
    """Verify the chain as the given transaction sees it."""
    checkpoints = await _checkpoints(session, org_id)
    checked = 0
    first: _Row | None = None
    previous: _Row | None = None
    broken: dict[str, Any] | None = None
    checkpoint_seq: int | None = None
    # A start that the checkpoint does not vouch for is reported at the first row, unless
    # the checkpoint row itself turns out to be altered: then that row is the culprit.
    unproven_start: dict[str, Any] | None = None
    async for row in _rows(session, org_id):
        checked += 1
        if first is None:
            first = row
            problem, checkpoint_seq = _start(row, checkpoints)
            if problem is not None and row["seq"] - 1 in checkpoints:
                unproven_start = {"seq": row["seq"], "id": row["id"], "reason": problem}
                problem = None
        else:
            problem = _link(previous, row)
        problem = _content(row, secret) or problem
        if problem is not None:
            broken = {"seq": row["seq"], "id": row["id"], "reason": problem}
            break
        previous = row
    if unproven_start is not None and (
        broken is None or broken["seq"] != checkpoints[unproven_start["seq"] - 1][1]
    ):
        broken = unproven_start
    return {
        "org_id": org_id,
        "ok": broken is None,
        "checked": checked,
        "first_seq": first["seq"] if first is not None else None,
        "last_seq": previous["seq"] if previous is not None and broken is None else None,
        "head_hash": previous["hash"] if previous is not None and broken is None else None,
        "checkpoint_seq": checkpoint_seq,
        "broken": broken,
    }


async def _rows(session: AsyncSession, org_id: uuid.UUID | None) -> AsyncIterator[_Row]:
    after = 0
    while True:
        batch = (
            await session.execute(
                select(*_FIELDS, AuditLog.hash, cast(AuditLog.details, Text).label("details"))
                .where(in_chain(org_id), AuditLog.seq > after)
                .order_by(AuditLog.seq)
                .limit(_BATCH)
            )
        ).all()
        for row in batch:
            yield dict(row._mapping)
        if len(batch) < _BATCH:
            return
        after = batch[-1].seq


async def _checkpoints(
    session: AsyncSession, org_id: uuid.UUID | None
) -> dict[int, tuple[str, int]]:
    """Through-seq → (through-hash, the checkpoint's own seq); each is checked in the walk."""
    rows = await session.execute(
        select(AuditLog.seq, AuditLog.details).where(
            in_chain(org_id), AuditLog.action == chain.CHECKPOINT_ACTION
        )
    )
    found: dict[int, tuple[str, int]] = {}
    for seq, details in rows:
        through_seq, through_hash = details.get("through_seq"), details.get("through_hash")
        if isinstance(through_seq, int) and isinstance(through_hash, str):
            found[through_seq] = (through_hash, seq)
    return found


def _start(row: _Row, checkpoints: dict[int, tuple[str, int]]) -> tuple[str | None, int | None]:
    """Where the remaining chain begins: at the genesis, or just after a checkpoint."""
    if row["seq"] == 1:
        if row["prev_hash"] != chain.GENESIS_HASH:
            return "the first row does not link to the genesis hash", None
        return None, None
    through_hash = checkpoints.get(row["seq"] - 1, (None, 0))[0]
    if through_hash is None:
        return f"rows before seq {row['seq']} are missing and no checkpoint vouches for them", None
    if through_hash != row["prev_hash"]:
        return f"prev_hash does not match the checkpoint of seq {row['seq'] - 1}", row["seq"] - 1
    return None, row["seq"] - 1


def _link(previous: _Row | None, row: _Row) -> str | None:
    assert previous is not None  # noqa: S101 - every row after the first has one
    if row["seq"] != previous["seq"] + 1:
        return f"seq {row['seq']} follows seq {previous['seq']}: rows are missing or moved"
    if row["prev_hash"] != previous["hash"]:
        return f"prev_hash does not match the hash of seq {previous['seq']}"
    return None


def _content(row: _Row, secret: bytes) -> str | None:
    if chain.row_hash(row) != row["hash"]:
        return "hash mismatch: the row's stored content was changed"
    if row["action"] == chain.CHECKPOINT_ACTION:
        return _checkpoint(row, secret)
    return None


def _checkpoint(row: _Row, secret: bytes) -> str | None:
    details = loads(row["details"])
    through_seq, through_hash = details.get("through_seq"), details.get("through_hash")
    signature = details.get("signature")
    if not (
        isinstance(through_seq, int)
        and isinstance(through_hash, str)
        and isinstance(signature, str)
        and through_seq < row["seq"]
    ):
        return "malformed checkpoint"
    expected = chain.checkpoint_signature(
        secret, org_id=row["org_id"], through_seq=through_seq, through_hash=through_hash
    )
    if not hmac.compare_digest(expected, signature):
        return "checkpoint signature does not verify (wrong secret key, or forged)"
    return None

"""Retention: remove a chain's expired rows, leaving a signed checkpoint in their place.

The application role cannot delete audit rows; `apix_audit_prune` (migration 0007) does it
with the owner's rights, and only once the checkpoint appended here records the last
removed row's seq and hash, signed (HMAC) with the node's secret key.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, text

from apix.audit import chain
from apix.audit.errors import ChainBroken
from apix.audit.models import AuditLog
from apix.audit.service import (
    DEFAULT_RETENTION_DAYS,
    RequestMeta,
    in_chain,
    lock_chain,
    record,
    retention_days,
)
from apix.audit.verify import verify_in
from apix.core.time import utcnow
from apix.infra.database import Database

_META = RequestMeta(user_agent="apix audit prune")


async def prune(
    database: Database,
    org_id: uuid.UUID | None,
    secret: bytes,
    *,
    default_days: int = DEFAULT_RETENTION_DAYS,
    now: datetime | None = None,
) -> dict[str, Any]:
    """Remove ``org_id``'s rows older than its retention (the platform's chain when None).

    Refuses (`ChainBroken`) when the chain does not verify: evidence is not discarded.
    """
    now = now or utcnow()
    async with database.transaction(org_id) as uow:
        # Nothing joins the chain while it is checked and cut.
        await lock_chain(uow, org_id)
        days = await retention_days(uow, org_id) or default_days
        cutoff = now - timedelta(days=days)
        result: dict[str, Any] = {
            "org_id": org_id,
            "retention_days": days,
            "cutoff": cutoff,
            "removed": 0,
            "through_seq": None,
            "checkpoint_seq": None,
        }
        report = await verify_in(uow.session, org_id, secret)
        if not report["ok"]:
            raise ChainBroken(details=report["broken"])
        session = uow.session
        # The expired prefix: rows are appended in time order, so it ends just before the
        # oldest row still within retention (or at the head when every row has expired).
        kept = await session.scalar(
            select(func.min(AuditLog.seq)).where(in_chain(org_id), AuditLog.created_at >= cutoff)
        )
        through_seq = (
            kept - 1
            if kept is not None
            else await session.scalar(select(func.max(AuditLog.seq)).where(in_chain(org_id)))
        )
        if through_seq is None or report["first_seq"] is None or through_seq < report["first_seq"]:
            return result
        through_hash = await session.scalar(
            select(AuditLog.hash).where(in_chain(org_id), AuditLog.seq == through_seq)
        )
        assert through_hash is not None  # noqa: S101 - the chain verified without gaps
        checkpoint = await record(
            uow,
            chain.CHECKPOINT_ACTION,
            meta=_META,
            org_id=org_id,
            source="system",
            target_type="audit_log",
            details={
                "through_seq": through_seq,
                "through_hash": through_hash,
                "removed": through_seq - report["first_seq"] + 1,
                "retention_days": days,
                "cutoff": chain.format_timestamp(cutoff),
                "signature": chain.checkpoint_signature(
                    secret, org_id=org_id, through_seq=through_seq, through_hash=through_hash
                ),
            },
        )
        removed = await session.scalar(
            text("SELECT apix_audit_prune(:org, :through)"),
            {"org": org_id, "through": through_seq},
        )
        result.update(removed=removed, through_seq=through_seq, checkpoint_seq=checkpoint.seq)
        return result

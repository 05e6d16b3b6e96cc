"""Record audit events inside the caller's unit of work (so they commit with the change)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from apix.audit.models import AuditLog
from apix.infra.database import UnitOfWork


@dataclass(frozen=True, slots=True)
class RequestMeta:
    """Where a call came from: recorded with every audit event."""

    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None


async def record(
    uow: UnitOfWork,
    action: str,
    *,
    meta: RequestMeta,
    org_id: uuid.UUID | None = None,
    actor_user_id: uuid.UUID | None = None,
    actor_api_key_id: uuid.UUID | None = None,
    target_type: str | None = None,
    target_id: Any = None,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
    source: str = "app",
) -> AuditLog:
    """Append an event to ``org_id``'s chain (the platform's when None).

    The database links the row (seq, hashes, time) and holds the chain's lock until the
    caller's transaction ends, so concurrent writers to one organisation queue, never fork.
    """
    entry = AuditLog(
        org_id=org_id,
        actor_user_id=actor_user_id,
        actor_api_key_id=actor_api_key_id,
        action=action,
        target_type=target_type,
        target_id=None if target_id is None else str(target_id),
        outcome=outcome,
        source=source,
        ip=meta.ip,
        user_agent=meta.user_agent[:512] if meta.user_agent else None,
        request_id=meta.request_id,
        details=details or {},
    )
    uow.session.add(entry)
    await uow.session.flush()
    return entry

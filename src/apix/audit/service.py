"""Record audit events inside the caller's unit of work, and read an organisation's trail.

Every function works on one chain: an organisation's (``org_id``) or the platform's
(``org_id`` None, rows of no organisation, visible only to a transaction with no tenant).
"""

from __future__ import annotations

import base64
import binascii
import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

from sqlalchemy import ColumnElement, func, or_, select, text

from apix.audit.errors import InvalidTimeRange, ReservedAction, UnknownOrganization
from apix.audit.models import AuditLog, AuditSetting
from apix.audit.schemas import AuditEventCreate
from apix.core.errors import BadRequest
from apix.core.time import utcnow
from apix.identity.models import Organization
from apix.identity.principal import Principal
from apix.infra.database import Database, UnitOfWork

# Days an organisation's audit rows are kept unless it sets its own retention.
DEFAULT_RETENTION_DAYS = 365


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
    by: Principal | None = None,
    target_type: str | None = None,
    target_id: Any = None,
    outcome: str = "success",
    details: dict[str, Any] | None = None,
    source: str = "app",
) -> AuditLog:
    """Append an event to ``org_id``'s chain (the platform's when None).

    The database links the row (seq, hashes, time) and holds the chain's lock until the
    caller's transaction ends, so concurrent writers to one organisation queue, never fork.
    ``by``: the principal acting (its user or API key), instead of the two actor ids.
    """
    if by is not None:
        actor_user_id, actor_api_key_id = by.user_id, by.api_key_id
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


# Keys whose values never enter the trail (matched anywhere in the key, any case).
_SECRET_KEY = re.compile(
    r"pass(word|phrase)?|secret|token|api_?key|private|credential|authoriz|cookie"
)
REDACTED = "[redacted]"


def changes(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The fields that differ between two states, for an update's `details`:
    ``{"field": {"from": old, "to": new}}``, secret values redacted, values JSON-ready.

    A field missing on one side reads as None (created or deleted).
    """
    diff: dict[str, dict[str, Any]] = {}
    for key in sorted(before.keys() | after.keys(), key=str):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if _SECRET_KEY.search(str(key).lower()):
            diff[str(key)] = {
                "from": None if old is None else REDACTED,
                "to": None if new is None else REDACTED,
            }
        else:
            diff[str(key)] = {"from": _plain(old), "to": _plain(new)}
    return diff


def _plain(value: Any) -> Any:
    """JSON-ready, with secrets in nested objects redacted too."""
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if _SECRET_KEY.search(str(k).lower()) else _plain(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        items = [_plain(v) for v in value]
        return sorted(items, key=str) if isinstance(value, set | frozenset) else items
    if isinstance(value, enum.Enum):
        return _plain(value.value)
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    return value


def in_chain(org_id: uuid.UUID | None) -> ColumnElement[bool]:
    """The rows of one chain (row-level security scopes them too; this serves the index)."""
    return AuditLog.org_id.is_(None) if org_id is None else AuditLog.org_id == org_id


async def lock_chain(uow: UnitOfWork, org_id: uuid.UUID | None) -> None:
    """Take the lock the insert trigger takes: no row joins the chain until we commit."""
    await uow.session.execute(
        text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))"),
        {"key": f"apix.audit:{'platform' if org_id is None else org_id}"},
    )


def check_range(since: datetime | None, until: datetime | None) -> None:
    if since is not None and until is not None and since >= until:
        raise InvalidTimeRange(details={"from": since.isoformat(), "to": until.isoformat()})


def read(row: AuditLog) -> dict[str, Any]:
    return {column: getattr(row, column) for column in _COLUMNS}


_COLUMNS = (
    "id",
    "org_id",
    "seq",
    "actor_user_id",
    "actor_api_key_id",
    "action",
    "target_type",
    "target_id",
    "outcome",
    "source",
    "ip",
    "user_agent",
    "request_id",
    "details",
    "created_at",
    "prev_hash",
    "hash",
)


# --- reading ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LogFilter:
    actor: uuid.UUID | None = None
    action: str | None = None
    target_type: str | None = None
    target_id: str | None = None
    outcome: str | None = None
    source: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def where(self) -> list[ColumnElement[bool]]:
        check_range(self.since, self.until)
        clauses: list[ColumnElement[bool]] = []
        if self.actor is not None:
            clauses.append(
                or_(AuditLog.actor_user_id == self.actor, AuditLog.actor_api_key_id == self.actor)
            )
        if self.action is not None:
            if self.action.endswith(".*"):
                prefix = self.action[:-1].replace("\\", "\\\\").replace("%", r"\%")
                clauses.append(AuditLog.action.like(prefix.replace("_", r"\_") + "%"))
            else:
                clauses.append(AuditLog.action == self.action)
        for column, value in (
            (AuditLog.target_type, self.target_type),
            (AuditLog.target_id, self.target_id),
            (AuditLog.outcome, self.outcome),
            (AuditLog.source, self.source),
        ):
            if value is not None:
                clauses.append(column == value)
        if self.since is not None:
            clauses.append(AuditLog.created_at >= self.since)
        if self.until is not None:
            clauses.append(AuditLog.created_at < self.until)
        return clauses


async def list_logs(
    database: Database,
    org_id: uuid.UUID | None,
    filters: LogFilter,
    *,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    """A page of the chain's rows, newest first; ``cursor`` is the previous page's `next`."""
    query = select(AuditLog).where(in_chain(org_id), *filters.where())
    if cursor is not None:
        query = query.where(AuditLog.seq < _decode_cursor(cursor))
    query = query.order_by(AuditLog.seq.desc()).limit(limit + 1)
    async with database.transaction(org_id) as uow:
        rows = list((await uow.session.scalars(query)).all())
    page, more = rows[:limit], len(rows) > limit
    return {
        "items": [read(r) for r in page],
        "next": _encode_cursor(page[-1].seq) if more and page else None,
    }


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode()


def _decode_cursor(cursor: str) -> int:
    try:
        kind, _, seq = base64.urlsafe_b64decode(cursor.encode()).decode().partition(":")
        if kind != "seq" or not seq.isdigit():
            raise ValueError(cursor)
        return int(seq)
    except (ValueError, UnicodeDecodeError, binascii.Error) as exc:
        raise BadRequest("invalid cursor") from exc


async def summary(
    database: Database, org_id: uuid.UUID | None, *, since: datetime, until: datetime
) -> dict[str, Any]:
    """Counts by action, by actor and by outcome over ``[since, until)``."""
    check_range(since, until)
    scope = (
        in_chain(org_id),
        AuditLog.created_at >= since,
        AuditLog.created_at < until,
    )
    count = func.count().label("count")
    async with database.transaction(org_id) as uow:
        by_action = (
            await uow.session.execute(
                select(AuditLog.action, count)
                .where(*scope)
                .group_by(AuditLog.action)
                .order_by(count.desc(), AuditLog.action)
            )
        ).all()
        by_actor = (
            await uow.session.execute(
                select(AuditLog.actor_user_id, AuditLog.actor_api_key_id, count)
                .where(*scope)
                .group_by(AuditLog.actor_user_id, AuditLog.actor_api_key_id)
                .order_by(count.desc())
            )
        ).all()
        by_outcome = (
            await uow.session.execute(
                select(AuditLog.outcome, count).where(*scope).group_by(AuditLog.outcome)
            )
        ).all()
    return {
        "org_id": org_id,
        "from": since,
        "to": until,
        "total": sum(r.count for r in by_action),
        "by_outcome": {r.outcome: r.count for r in by_outcome},
        "by_action": [{"action": r.action, "count": r.count} for r in by_action],
        "by_actor": [
            {
                "actor_user_id": r.actor_user_id,
                "actor_api_key_id": r.actor_api_key_id,
                "count": r.count,
            }
            for r in by_actor
        ],
    }


# --- writing ----------------------------------------------------------------------------


async def log_event(
    database: Database, principal: Principal, data: AuditEventCreate, meta: RequestMeta
) -> dict[str, Any]:
    """Record an event an integration (API key or user) reports about itself."""
    if data.action.startswith("audit."):
        raise ReservedAction(details={"action": data.action})
    assert principal.org_id is not None  # noqa: S101 - the route's guard ensures one
    async with database.transaction(principal.org_id) as uow:
        row = await record(
            uow,
            data.action,
            meta=meta,
            org_id=principal.org_id,
            by=principal,
            target_type=data.target_type,
            target_id=data.target_id,
            outcome=data.outcome,
            details=data.details,
            source="integration",
        )
        return read(row)


# --- retention --------------------------------------------------------------------------


async def retention_days(uow: UnitOfWork, org_id: uuid.UUID | None) -> int | None:
    """The organisation's own retention, if it set one (the platform chain has none)."""
    if org_id is None:
        return None
    return await uow.session.scalar(
        select(AuditSetting.retention_days).where(AuditSetting.org_id == org_id)
    )


async def get_retention(database: Database, org_id: uuid.UUID) -> dict[str, Any]:
    async with database.transaction(org_id) as uow:
        days = await retention_days(uow, org_id)
    return _retention(org_id, days)


async def set_retention(
    database: Database,
    principal: Principal,
    org_id: uuid.UUID,
    days: int | None,
    meta: RequestMeta,
) -> dict[str, Any]:
    """Set (or, with None, clear) the organisation's retention; the change is audited."""
    async with database.transaction(org_id) as uow:
        setting = await uow.session.get(AuditSetting, org_id, with_for_update=True)
        previous = setting.retention_days if setting else None
        if days is None:
            if setting is not None:
                await uow.session.delete(setting)
        elif setting is None:
            uow.session.add(AuditSetting(org_id=org_id, retention_days=days))
        else:
            setting.retention_days = days
            setting.updated_at = utcnow()
        await uow.session.flush()
        await record(
            uow,
            "audit.retention_changed",
            meta=meta,
            org_id=org_id,
            by=principal,
            target_type="organization",
            target_id=org_id,
            details={"from": previous, "to": days, "default_days": DEFAULT_RETENTION_DAYS},
        )
    return _retention(org_id, days)


def _retention(org_id: uuid.UUID, days: int | None) -> dict[str, Any]:
    return {
        "org_id": org_id,
        "retention_days": DEFAULT_RETENTION_DAYS if days is None else days,
        "override": days is not None,
        "default_days": DEFAULT_RETENTION_DAYS,
    }


# --- organisations ----------------------------------------------------------------------


async def ensure_organization(database: Database, org_id: uuid.UUID) -> None:
    """404 unless the organisation exists (a platform operator naming one)."""
    async with database.transaction() as uow:
        if await uow.session.get(Organization, org_id) is None:
            raise UnknownOrganization


async def organization_ids(database: Database) -> list[uuid.UUID]:
    async with database.transaction() as uow:
        return list(await uow.session.scalars(select(Organization.id).order_by(Organization.id)))

"""The compliance report: what an auditor asks for, over a period, as JSON or CSV.

Producing it is itself audited (`audit.exported`), in the same transaction that read it.
"""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from apix.audit.models import AuditLog
from apix.audit.service import RequestMeta, check_range, in_chain, read, record
from apix.audit.verify import verify_in
from apix.core.json import dumps
from apix.core.time import utcnow
from apix.identity.principal import Principal
from apix.infra.database import Database

# Rows listed per section; the count is always exact, `truncated` says when rows are left out.
SECTION_LIMIT = 5000

_SECTIONS: dict[str, ColumnElement[bool]] = {
    "authentication": or_(
        AuditLog.action.like("auth.%"),
        AuditLog.action.like("user.mfa%"),
        AuditLog.action == "user.password_changed",
    ),
    "failed_access": AuditLog.outcome != "success",
    "privilege_changes": or_(
        AuditLog.action.like("member.%"),
        AuditLog.action.like("invitation.%"),
        AuditLog.action.like("platform.%"),
        AuditLog.action.in_(
            ("organization.suspended", "organization.reactivated", "audit.retention_changed")
        ),
    ),
    "data_exports": or_(AuditLog.action.like("%.exported"), AuditLog.action.like("%.export")),
    "api_key_lifecycle": AuditLog.action.like("api_key.%"),
}

CSV_COLUMNS = (
    "section",
    "seq",
    "id",
    "created_at",
    "action",
    "outcome",
    "source",
    "actor_user_id",
    "actor_api_key_id",
    "target_type",
    "target_id",
    "ip",
    "details",
)


async def compliance_report(
    database: Database,
    principal: Principal,
    org_id: uuid.UUID | None,
    *,
    since: datetime,
    until: datetime,
    secret: bytes,
    export_format: str,
    meta: RequestMeta,
) -> dict[str, Any]:
    check_range(since, until)
    period = and_(in_chain(org_id), AuditLog.created_at >= since, AuditLog.created_at < until)
    report: dict[str, Any] = {"org_id": org_id, "from": since, "to": until}
    async with database.transaction(org_id) as uow:
        session = uow.session
        for name, condition in _SECTIONS.items():
            where = and_(period, condition)
            count = await session.scalar(select(func.count()).where(where)) or 0
            rows = await session.scalars(
                select(AuditLog).where(where).order_by(AuditLog.seq).limit(SECTION_LIMIT)
            )
            report[name] = {
                "count": count,
                "truncated": count > SECTION_LIMIT,
                "events": [read(r) for r in rows],
            }
        report["per_user_activity"] = await _activity(session, period)
        report["chain_verification"] = await verify_in(session, org_id, secret)
        report["generated_at"] = utcnow()
        await record(
            uow,
            "audit.exported",
            meta=meta,
            org_id=org_id,
            by=principal,
            target_type="compliance_report",
            details={
                "format": export_format,
                "from": since.isoformat(),
                "to": until.isoformat(),
                "events": sum(report[name]["count"] for name in _SECTIONS),
                "chain_ok": report["chain_verification"]["ok"],
            },
        )
    return report


async def _activity(session: AsyncSession, period: ColumnElement[bool]) -> list[dict[str, Any]]:
    """Per actor (user or API key): events, failures, first and last, counts by action."""
    failed = func.count().filter(AuditLog.outcome != "success")
    rows = await session.execute(
        select(
            AuditLog.actor_user_id,
            AuditLog.actor_api_key_id,
            AuditLog.action,
            func.count().label("events"),
            failed.label("failures"),
            func.min(AuditLog.created_at).label("first_at"),
            func.max(AuditLog.created_at).label("last_at"),
        )
        .where(period)
        .group_by(AuditLog.actor_user_id, AuditLog.actor_api_key_id, AuditLog.action)
    )
    actors: dict[tuple[Any, Any], dict[str, Any]] = {}
    for row in rows:
        key = (row.actor_user_id, row.actor_api_key_id)
        actor = actors.setdefault(
            key,
            {
                "actor_user_id": row.actor_user_id,
                "actor_api_key_id": row.actor_api_key_id,
                "events": 0,
                "failures": 0,
                "first_at": row.first_at,
                "last_at": row.last_at,
                "actions": {},
            },
        )
        actor["events"] += row.events
        actor["failures"] += row.failures
        actor["first_at"] = min(actor["first_at"], row.first_at)
        actor["last_at"] = max(actor["last_at"], row.last_at)
        actor["actions"][row.action] = row.events
    return sorted(actors.values(), key=lambda a: (-a["events"], str(a["actor_user_id"])))


def to_csv(report: dict[str, Any]) -> str:
    """One table: the sections' events, then a row per actor, then the chain's verdict."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(CSV_COLUMNS)
    for name in _SECTIONS:
        for event in report[name]["events"]:
            writer.writerow(_cells(name, event))
    for actor in report["per_user_activity"]:
        writer.writerow(
            _cells(
                "per_user_activity",
                {
                    "actor_user_id": actor["actor_user_id"],
                    "actor_api_key_id": actor["actor_api_key_id"],
                    "created_at": actor["last_at"],
                    "details": {
                        "events": actor["events"],
                        "failures": actor["failures"],
                        "first_at": actor["first_at"].isoformat(),
                        "actions": actor["actions"],
                    },
                },
            )
        )
    verdict = report["chain_verification"]
    writer.writerow(
        _cells(
            "chain_verification",
            {
                "seq": verdict["last_seq"],
                "outcome": "success" if verdict["ok"] else "failure",
                "created_at": report["generated_at"],
                "details": verdict,
            },
        )
    )
    return out.getvalue()


def _cells(section: str, values: dict[str, Any]) -> Iterable[str]:
    yield section
    for column in CSV_COLUMNS[1:]:
        yield _cell(values.get(column))


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return dumps(value).decode()
    text = str(value)
    # A spreadsheet would run a cell starting like a formula (CSV injection).
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + text
    return text

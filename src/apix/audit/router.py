"""The audit API (`/api/v1/audit`): the trail, its verification, summaries and reports."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Annotated

from fastapi import Query, Response, status

from apix.audit import report, service, verify
from apix.audit.deps import DatabaseDep, OrgAdmin, Reader, SecretDep, Writer
from apix.audit.errors import UnknownOrganization
from apix.audit.schemas import (
    AuditEventCreate,
    AuditLogPage,
    AuditLogRead,
    AuditSummary,
    ChainVerification,
    ComplianceReport,
    Outcome,
    ReportFormat,
    RetentionRead,
    RetentionUpdate,
)
from apix.core.errors import ErrorResponse
from apix.core.routing import api_router
from apix.core.time import utcnow
from apix.identity.deps import Meta

_ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}
router = api_router(prefix="/api/v1/audit", tags=["audit"], responses=_ERRORS)

# The period a summary or report covers when the caller names none.
DEFAULT_PERIOD = timedelta(days=30)

From = Annotated[datetime | None, Query(alias="from", description="Start (inclusive).")]
To = Annotated[datetime | None, Query(alias="to", description="End (exclusive); default: now.")]
Short = Annotated[str | None, Query(max_length=100)]


def _period(since: datetime | None, until: datetime | None) -> tuple[datetime, datetime]:
    until = until or utcnow()
    return since or until - DEFAULT_PERIOD, until


@router.get("/logs")
async def list_logs(
    scope: Reader,
    database: DatabaseDep,
    actor: Annotated[uuid.UUID | None, Query(description="A user's or an API key's id.")] = None,
    action: Annotated[
        str | None, Query(max_length=100, description="Exact, or a prefix as `auth.*`.")
    ] = None,
    target_type: Short = None,
    target_id: Short = None,
    outcome: Outcome | None = None,
    source: Annotated[str | None, Query(pattern="^(app|integration|system)$")] = None,
    since: From = None,
    until: Annotated[datetime | None, Query(alias="to", description="End (exclusive).")] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> AuditLogPage:
    """The audit trail, newest first, filtered (cursor pagination)."""
    filters = service.LogFilter(
        actor=actor,
        action=action,
        target_type=target_type,
        target_id=target_id,
        outcome=outcome,
        source=source,
        since=since,
        until=until,
    )
    page = await service.list_logs(database, scope.org_id, filters, cursor=cursor, limit=limit)
    return AuditLogPage.model_validate(page)


@router.post("/log-event", status_code=status.HTTP_201_CREATED)
async def log_event(
    data: AuditEventCreate, principal: Writer, database: DatabaseDep, meta: Meta
) -> AuditLogRead:
    """Record an event of the calling integration (marked `source: integration`)."""
    return AuditLogRead.model_validate(await service.log_event(database, principal, data, meta))


@router.get("/verify")
async def verify_chain(
    scope: Reader, database: DatabaseDep, secret: SecretDep
) -> ChainVerification:
    """Check the trail's hash chain; report the first broken link."""
    return ChainVerification.model_validate(await verify.verify(database, scope.org_id, secret))


@router.get("/summary")
async def summary(
    scope: Reader, database: DatabaseDep, since: From = None, until: To = None
) -> AuditSummary:
    """Counts by action, actor and outcome over a period (default: the last 30 days)."""
    since, until = _period(since, until)
    result = await service.summary(database, scope.org_id, since=since, until=until)
    return AuditSummary.model_validate(result)


@router.get(
    "/compliance-report",
    response_model=ComplianceReport,
    responses={200: {"content": {"text/csv": {}}}},
)
async def compliance_report(
    scope: Reader,
    database: DatabaseDep,
    secret: SecretDep,
    meta: Meta,
    since: From = None,
    until: To = None,
    format_: Annotated[ReportFormat, Query(alias="format")] = "json",
) -> ComplianceReport | Response:
    """Authentication, failed access, privilege changes, exports, API keys, per-user
    activity and the chain's verification over a period; the export is itself audited."""
    since, until = _period(since, until)
    result = await report.compliance_report(
        database,
        scope.principal,
        scope.org_id,
        since=since,
        until=until,
        secret=secret,
        export_format=format_,
        meta=meta,
    )
    if format_ == "csv":
        name = f"compliance-{since:%Y%m%d}-{until:%Y%m%d}.csv"
        return Response(
            report.to_csv(result),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )
    return ComplianceReport.model_validate(result)


@router.get("/retention")
async def get_retention(scope: Reader, database: DatabaseDep) -> RetentionRead:
    """How long the organisation's audit rows are kept."""
    if scope.org_id is None:
        raise UnknownOrganization("the platform trail has no retention setting")
    return RetentionRead.model_validate(await service.get_retention(database, scope.org_id))


@router.put("/retention")
async def set_retention(
    data: RetentionUpdate, principal: OrgAdmin, database: DatabaseDep, meta: Meta
) -> RetentionRead:
    """Set the organisation's retention in days (null: back to the platform default)."""
    assert principal.org_id is not None  # noqa: S101 - the guard ensures one
    result = await service.set_retention(
        database, principal, principal.org_id, data.retention_days, meta
    )
    return RetentionRead.model_validate(result)

"""Analytics queries over the roll-ups (organisation-scoped, under row-level security)."""

from __future__ import annotations

import csv
import io
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, literal_column, select

from apix.analytics.models import ApiMinute, EventMinute
from apix.core.errors import AppError
from apix.infra.database import Database
from apix.realtime.models import ApixConnection

Granularity = Literal["minute", "hour", "day"]
_MAX_BUCKETS = 10_000


class InvalidRange(AppError):
    status_code = 422
    code = "validation_error"
    message = "the time range is not valid"


_STEP = {"minute": timedelta(minutes=1), "hour": timedelta(hours=1), "day": timedelta(days=1)}


def time_range(
    since: datetime | None, until: datetime | None, granularity: Granularity
) -> tuple[datetime, datetime]:
    """The range asked for (default: the last 24 hours), checked against its bucket count."""
    until = _aware(until) or datetime.now(UTC)
    since = _aware(since) or until - timedelta(days=1)
    if since >= until:
        raise InvalidRange("`from` must be before `to`")
    if (until - since) / _STEP[granularity] > _MAX_BUCKETS:
        raise InvalidRange(
            f"more than {_MAX_BUCKETS} {granularity} buckets: narrow the range or widen "
            "the granularity"
        )
    return since, until


def _aware(at: datetime | None) -> datetime | None:
    if at is not None and at.tzinfo is None:
        return at.replace(tzinfo=UTC)
    return at


def _bucket(column: Any, granularity: Granularity) -> Any:
    return func.date_trunc(literal_column(f"'{granularity}'"), column).label("bucket")


async def events(
    database: Database,
    org_id: uuid.UUID,
    *,
    since: datetime,
    until: datetime,
    granularity: Granularity,
    namespace: str | None,
    event_type: str | None,
) -> list[dict[str, Any]]:
    bucket = _bucket(EventMinute.minute, granularity)
    query = (
        select(bucket, EventMinute.namespace, EventMinute.type, func.sum(EventMinute.count))
        .where(
            EventMinute.org_id == org_id,
            EventMinute.minute >= since,
            EventMinute.minute < until,
        )
        .group_by(bucket, EventMinute.namespace, EventMinute.type)
        .order_by(bucket, EventMinute.namespace, EventMinute.type)
    )
    if namespace is not None:
        query = query.where(EventMinute.namespace == namespace)
    if event_type is not None:
        query = query.where(EventMinute.type == event_type)
    async with database.transaction(org_id) as uow:
        rows = (await uow.session.execute(query)).all()
    return [{"bucket": b, "namespace": ns, "type": t, "count": int(n)} for b, ns, t, n in rows]


async def connections(
    database: Database,
    org_id: uuid.UUID,
    *,
    since: datetime,
    until: datetime,
    granularity: Granularity,
) -> list[dict[str, Any]]:
    """Connections opened and closed per bucket (from the connection records)."""
    out: dict[datetime, dict[str, Any]] = {}
    async with database.transaction(org_id) as uow:
        for column, key in (
            (ApixConnection.connected_at, "opened"),
            (ApixConnection.disconnected_at, "closed"),
        ):
            bucket = _bucket(column, granularity)
            rows = await uow.session.execute(
                select(bucket, func.count())
                .where(ApixConnection.org_id == org_id, column >= since, column < until)
                .group_by(bucket)
            )
            for at, n in rows:
                out.setdefault(at, {"bucket": at, "opened": 0, "closed": 0})[key] = int(n)
    return [out[at] for at in sorted(out)]


async def usage(
    database: Database,
    org_id: uuid.UUID,
    *,
    since: datetime,
    until: datetime,
    granularity: Granularity,
    api_key_id: uuid.UUID | None,
) -> list[dict[str, Any]]:
    bucket = _bucket(ApiMinute.minute, granularity)
    query = (
        select(
            bucket, ApiMinute.api_key_id, func.sum(ApiMinute.requests), func.sum(ApiMinute.errors)
        )
        .where(ApiMinute.org_id == org_id, ApiMinute.minute >= since, ApiMinute.minute < until)
        .group_by(bucket, ApiMinute.api_key_id)
        .order_by(bucket, ApiMinute.api_key_id)
    )
    if api_key_id is not None:
        query = query.where(ApiMinute.api_key_id == api_key_id)
    async with database.transaction(org_id) as uow:
        rows = (await uow.session.execute(query)).all()
    return [
        {"bucket": b, "api_key_id": k, "requests": int(r), "errors": int(e)} for b, k, r, e in rows
    ]


async def overview(
    database: Database, org_id: uuid.UUID, *, since: datetime, until: datetime
) -> dict[str, Any]:
    rows = await events(
        database,
        org_id,
        since=since,
        until=until,
        granularity="day",
        namespace=None,
        event_type=None,
    )
    by_namespace: dict[str, int] = {}
    for row in rows:
        by_namespace[row["namespace"]] = by_namespace.get(row["namespace"], 0) + row["count"]
    opened = sum(
        r["opened"]
        for r in await connections(database, org_id, since=since, until=until, granularity="day")
    )
    calls = await usage(
        database, org_id, since=since, until=until, granularity="day", api_key_id=None
    )
    return {
        "from": since,
        "to": until,
        "events": sum(by_namespace.values()),
        "events_by_namespace": dict(sorted(by_namespace.items(), key=lambda kv: -kv[1])),
        "connections_opened": opened,
        "api_requests": sum(r["requests"] for r in calls),
        "api_errors": sum(r["errors"] for r in calls),
    }


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: v.isoformat() if isinstance(v, datetime) else v for k, v in row.items()}
        )
    return buffer.getvalue()

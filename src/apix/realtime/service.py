"""Publishing and reading channels, shared by the WebSocket, SSE and HTTP surfaces."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import literal, select, tuple_

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.cursor import decode_cursor, encode_cursor
from apix.core.errors import BadRequest, Conflict, NotFound
from apix.core.json import loads
from apix.identity.principal import Principal
from apix.infra.database import Database
from apix.realtime import channels
from apix.realtime.broker import Broker, Snapshot, UnstorableData
from apix.realtime.channels import ChannelRef
from apix.realtime.models import ApixDeadLetter


async def publish(
    broker: Broker,
    principal: Principal,
    channel: ChannelRef,
    event_type: str,
    data: Any,
    *,
    idempotency_key: str | None = None,
) -> dict[str, Any]:
    actor = str(principal.user_id or principal.api_key_id)
    try:
        published = await broker.publish(
            channel,
            event_type,
            data,
            meta={"actor": actor, "actor_kind": principal.kind.value},
            idempotency_key=idempotency_key,
            strict=True,
        )
    except orjson.JSONEncodeError as exc:  # e.g. a lone surrogate (`"\ud800"`) in a string
        raise BadRequest(f"data cannot be stored as JSON: {exc}") from exc
    except UnstorableData as exc:
        raise BadRequest(f"data cannot be stored: {exc}") from exc
    return {
        "offset": published.offset,
        "epoch": published.epoch,
        "id": published.id,
        "duplicate": published.duplicate,
    }


Recover = Callable[
    [ChannelRef, Snapshot, str, str | None, int | None], Awaitable[tuple[Snapshot, bool]]
]


async def history(
    broker: Broker,
    channel: ChannelRef,
    *,
    since: str | None,
    limit: int,
    reverse: bool,
    epoch: str | None = None,
    recover: Recover | None = None,
) -> dict[str, Any]:
    """Events after ``since`` (or the last ``limit``); ``recover`` reads what the stream
    dropped from the archive."""
    if since is not None:
        snapshot = await broker.read(channel, after=since, limit=limit, reverse=reverse)
        if recover is not None and not snapshot.covers(since, epoch):
            if not reverse:
                snapshot, _ = await recover(channel, snapshot, since, epoch, limit)
                snapshot = replace(snapshot, events=snapshot.events[:limit])
            elif len(snapshot.events) < limit:
                # Newest first: the archived events nearest the stream, so all of them.
                older, _ = await recover(channel, replace(snapshot, events=[]), since, epoch, None)
                room = limit - len(snapshot.events)
                tail = list(reversed(older.events))[:room]
                snapshot = replace(snapshot, events=[*snapshot.events, *tail])
    else:
        snapshot = await broker.read(channel, last=limit, reverse=reverse)
    events = [
        {
            "op": "event",
            "channel": channel.name,
            "offset": e.offset,
            "epoch": snapshot.epoch,
            **loads(e.payload),
            "attempt": 1,
        }
        for e in snapshot.events
    ]
    return {
        "events": events,
        "position": {"offset": snapshot.last_offset, "epoch": snapshot.epoch},
    }


async def dead_letters(
    database: Database,
    org_id: uuid.UUID,
    *,
    channel: str | None,
    since: datetime | None,
    until: datetime | None,
    status: str | None,
    cursor: str | None,
    limit: int,
) -> dict[str, Any]:
    """A page of dead letters, newest first; ``cursor`` is the previous page's `next`."""
    query = select(ApixDeadLetter).where(ApixDeadLetter.org_id == org_id)
    if channel is not None:
        query = query.where(ApixDeadLetter.channel == channel)
    if since is not None:
        query = query.where(ApixDeadLetter.failed_at >= since)
    if until is not None:
        query = query.where(ApixDeadLetter.failed_at < until)
    if status is not None:
        query = query.where(ApixDeadLetter.status == status)
    if cursor is not None:
        at, row_id = decode_cursor(cursor)
        query = query.where(
            tuple_(ApixDeadLetter.failed_at, ApixDeadLetter.id)
            < tuple_(literal(at), literal(row_id))
        )
    query = query.order_by(ApixDeadLetter.failed_at.desc(), ApixDeadLetter.id.desc()).limit(
        limit + 1
    )
    async with database.transaction(org_id) as uow:
        rows = list((await uow.session.scalars(query)).all())
    page, more = rows[:limit], len(rows) > limit
    return {
        "items": [_dead_letter(r) for r in page],
        "next": encode_cursor(page[-1].failed_at, page[-1].id) if more and page else None,
    }


async def resolve_dead_letter(
    database: Database,
    broker: Broker,
    principal: Principal,
    dead_letter_id: uuid.UUID,
    *,
    redeliver: bool,
) -> dict[str, Any]:
    """Redeliver (publish the event again to its channel) or discard a dead letter."""
    assert principal.org_id is not None  # noqa: S101
    async with database.transaction(principal.org_id) as uow:
        row = await uow.session.get(ApixDeadLetter, dead_letter_id, with_for_update=True)
        if row is None or row.org_id != principal.org_id:
            raise NotFound("no such dead letter")
        if row.status != "pending":
            raise Conflict(f"the dead letter is already {row.status}")
        if redeliver:
            channel = channels.parse(row.channel, principal)
            await broker.publish(
                channel,
                row.type,
                row.event.get("data"),
                meta={"redelivery_of": row.event_id, "actor": str(principal.actor_id)},
            )
        row.status = "redelivered" if redeliver else "discarded"
        row.resolved_at = datetime.now(UTC)
        await audit.record(
            uow,
            f"dead_letter.{row.status}",
            meta=RequestMeta(),
            org_id=principal.org_id,
            by=principal,
            target_type="dead_letter",
            target_id=row.id,
        )
        return _dead_letter(row)


def _dead_letter(row: ApixDeadLetter) -> dict[str, Any]:
    return {
        "id": str(row.id),
        "channel": row.channel,
        "offset": row.offset,
        "epoch": row.epoch,
        "event": row.event,
        "connection_id": row.connection_id,
        "user_id": str(row.user_id) if row.user_id else None,
        "attempts": row.attempts,
        "status": row.status,
        "failed_at": row.failed_at,
        "resolved_at": row.resolved_at,
    }

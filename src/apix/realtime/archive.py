"""The archiver: every tenant channel event (but `monitor`'s), written once to PostgreSQL
(`apix_event`).

The publish script queues each event on its partition's archive stream (`archive_key`).
Archivers read those streams through one consumer group. A partition is read by one
archiver at a time (a lease in Redis), so a channel's events are archived in offset
order and `archived` (in the channel's metadata, which trimming waits for) only ever
names a position the archive holds everything up to. Archivers share the partitions
fairly; when one dies its leases expire, and whoever takes a partition first claims the
dead consumer's pending entries (XAUTOCLAIM) and writes them before anything newer.
Rows are keyed by their stream position, so writing an entry twice is a no-op.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from redis.asyncio import Redis
from redis.exceptions import ResponseError
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from apix.config import WorkerSettings
from apix.core.json import dumps, loads
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.infra.database import Database, driver_of
from apix.realtime.broker import Broker, StoredEvent, event_payload, offset_key
from apix.realtime.channels import (
    PARTITIONS,
    ChannelRef,
    archive_key,
    channel_prefix,
    org_uuid,
)

log = get_logger(__name__)

GROUP = "archivers"
_WORKERS = "apix:archive:workers"  # sorted set: archiver → last heartbeat (ms)
_BLOCK_MS = 500
_GATHER_S = 0.1  # at most ten archive rounds a second while events trickle in
_UPKEEP_S = 3600.0
_DAYS_AHEAD = 3
_CLOCK_SLACK = timedelta(minutes=5)
_ROWS_PER_INSERT = 1000  # rows per statement: its arrays stay a few hundred KiB

# KEYS: lease. ARGV: owner, ttl_ms. Extend the lease if we still hold it.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lease. ARGV: owner. Give the lease up if we hold it.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def default_consumer() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_key(partition: int) -> str:
    return f"{archive_key(partition)}:lease"


# One statement for any number of rows: the columns go as arrays. A multi-row VALUES is a
# new statement for each batch size (prepared again by asyncpg and planned again by
# PostgreSQL), and SQLAlchemy's executemany did work per row and column; the archiver of
# a node taking 2,000 connects a second spent a core on it.
#
# PostgreSQL takes each event's JSON as the node wrote it and picks the columns out of it,
# and counts what it wrote into the organisation's minutes in the same statement (only rows
# written now: a rewrite never counts twice). The archiver parses no event and builds no row:
# doing both, and counting in a second statement, was half its CPU an event. `created_at` is
# the publish time (`ts`, else the offset's milliseconds), part of the key, so a rewrite lands
# in the same partition. `ack_state` and `retry_count` take their column defaults.
_COUNT_WRITTEN = """
INSERT INTO analytics_event_minute AS m (org_id, minute, namespace, type, count)
SELECT $1::uuid, date_trunc('minute', created_at, 'UTC'), split_part(channel, ':', 1), type,
       count(*)
FROM written
GROUP BY 2, 3, 4
ON CONFLICT (org_id, minute, namespace, type) DO UPDATE SET count = m.count + excluded.count
"""
_INSERT_EVENTS = "".join(
    (
        """
WITH written AS (
    INSERT INTO apix_event (org_id, channel, epoch, offset_ms, offset_seq, created_at, id,
                            type, payload, metadata, session_id)
    SELECT $1::uuid, r.channel, r.epoch, r.ms, r.seq,
           timestamptz 'epoch' + coalesce((r.e ->> 'ts')::bigint, r.ms) * interval '1 ms',
           r.e ->> 'id', left(r.e ->> 'type', 100), coalesce(r.e -> 'data', 'null'),
           CASE WHEN jsonb_typeof(r.e -> 'meta') = 'object' THEN r.e -> 'meta' ELSE '{}' END,
           CASE WHEN split_part(r.channel, ':', 1) = 'sessions'
                THEN substr(r.channel, length('sessions:') + 1)
                ELSE r.e -> 'meta' ->> 'session_id' END
    FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::jsonb[])
         AS r(channel, epoch, ms, seq, e)
    ON CONFLICT DO NOTHING
    RETURNING channel, type, created_at
)""",
        _COUNT_WRITTEN,
    )
)

# The same from rows built in Python (`_row`), for what PostgreSQL refused in a batch: written
# one at a time, each in a savepoint, so the rows it still refuses are dropped alone. (Both
# statements are joined from constants, not added: the linter takes `+` of SQL for injection.)
_INSERT_ROWS = "".join(
    (
        """
WITH written AS (
    INSERT INTO apix_event (org_id, channel, epoch, offset_ms, offset_seq, created_at, id,
                            type, payload, metadata, session_id)
    SELECT $1::uuid, r.*
    FROM unnest($2::text[], $3::text[], $4::bigint[], $5::bigint[], $6::timestamptz[],
                $7::text[], $8::text[], $9::jsonb[], $10::jsonb[], $11::text[]) AS r
    ON CONFLICT DO NOTHING
    RETURNING channel, type, created_at
)""",
        _COUNT_WRITTEN,
    )
)
_COLUMNS = (
    "channel",
    "epoch",
    "offset_ms",
    "offset_seq",
    "created_at",
    "id",
    "type",
    "payload",
    "metadata",
    "session_id",
)
# What PostgreSQL answers for a row it cannot store (a value it cannot hold, such as U+0000,
# one too long, a missing column, an organisation deleted meanwhile): never retried.
_REFUSED = (asyncpg.exceptions.DataError, asyncpg.exceptions.IntegrityConstraintViolationError)
_STREAM_ID = re.compile(r"^\d+-\d+$")

Entry = tuple[str, str, dict[bytes, bytes] | None]  # archive queue, entry id, fields


@dataclass
class ArchiverStats:
    archived: int = 0  # rows written (including rewrites that were no-ops)
    batches: int = 0
    skipped: int = 0  # malformed entries dropped
    failures: int = 0


class Archiver:
    def __init__(
        self,
        redis: Redis,
        database: Database,
        broker: Broker,
        settings: WorkerSettings,
        *,
        consumer: str | None = None,
    ) -> None:
        self.redis = redis
        self.database = database
        self.broker = broker
        self.settings = settings
        self.consumer = consumer or default_consumer()
        self.owned: set[int] = set()
        self._draining: set[int] = set()  # owned partitions whose pending entries come first
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._next_leases = 0.0
        self._retry_at = 0.0
        self._failures_in_a_row = 0
        self.stats = ArchiverStats()
        self._loops = [
            Periodic("apix-archiver", 0.0, self.step),
            Periodic("apix-archive-upkeep", _UPKEEP_S, self.upkeep),
        ]

    async def start(self) -> None:
        try:
            await self.upkeep()
        except Exception:
            log.warning("archive: partition upkeep failed; retrying later", exc_info=True)
        for loop in self._loops:
            loop.start()

    async def stop(self) -> None:
        for loop in self._loops:
            await loop.stop()
        try:
            await self._give_up(set(self.owned))
            await self.redis.zrem(_WORKERS, self.consumer)
        except Exception:
            log.warning("archive: could not release leases; they expire", exc_info=True)

    # --- one round ---------------------------------------------------------------------

    async def step(self) -> None:
        now = time.monotonic()
        if now < self._retry_at:
            await asyncio.sleep(min(0.2, self._retry_at - now))
            return
        try:
            if now >= self._next_leases:
                await self.balance()
                self._next_leases = now + self.settings.lease_ms / 3000
            if not self.owned:
                await asyncio.sleep(_BLOCK_MS / 1000)
                return
            handled = await self.archive_once()
            self._failures_in_a_row = 0
            if 0 < handled < self.settings.archive_batch:
                # A trickle: let it gather for a moment, so rows go in tens, not ones.
                await asyncio.sleep(_GATHER_S)
        except Exception as exc:
            if isinstance(exc, ResponseError) and "NOGROUP" in str(exc):
                # Redis lost its data (restarted without persistence): leases are gone too.
                log.warning("archive: consumer group gone; taking partitions again")
                self.owned.clear()
                self._draining.clear()
                self._next_leases = 0.0
                return
            # PostgreSQL or Redis is away: entries stay pending and are written once it is
            # back (pending entries are read first again).
            self.stats.failures += 1
            self._failures_in_a_row += 1
            self._draining |= self.owned
            delay = min(5.0, 0.1 * 2**self._failures_in_a_row)
            self._retry_at = time.monotonic() + delay
            log.warning("archive: round failed; retrying", retry_in_s=delay, exc_info=True)

    async def archive_once(self) -> int:
        """Read one batch from the owned partitions and write it; returns entries handled."""
        partitions = sorted(self.owned)
        streams: dict[Any, Any] = {
            archive_key(p): ("0" if p in self._draining else ">") for p in partitions
        }
        block = None if any(i == "0" for i in streams.values()) else _BLOCK_MS
        replies: Any = await self.redis.xreadgroup(
            GROUP, self.consumer, streams, count=self.settings.archive_batch, block=block
        )
        entries: list[Entry] = []
        for key_raw, items in replies or []:
            key = key_raw.decode() if isinstance(key_raw, bytes) else key_raw
            if not items and streams.get(key) == "0":
                self._draining.discard(int(key.rsplit("{p", 1)[1].rstrip("}")))
            entries.extend((key, entry_id.decode(), fields) for entry_id, fields in items)
        if entries:
            await self.write(entries)
        return len(entries)

    async def write(self, entries: Sequence[Entry]) -> None:
        """Write entries to the archive, mark their channels archived, and take them off the
        queue. An organisation's batch that PostgreSQL refuses, and an entry it would refuse
        (one holding U+0000) or that cannot be read, go row by row (`_write_rows`): one event
        it cannot store never holds back its partition."""
        batch = _sort(entries)
        archived = skipped = 0
        async with self.database.engine.begin() as conn:
            driver = await driver_of(conn)
            for org_id, columns in batch.columns.items():
                await _as_tenant(conn, org_id)
                try:
                    async with _savepoint(driver):
                        for start in range(0, len(columns[0]), _ROWS_PER_INSERT):
                            chunk = [c[start : start + _ROWS_PER_INSERT] for c in columns]
                            await driver.execute(_INSERT_EVENTS, org_id, *chunk)
                    archived += len(columns[0])
                except _REFUSED:
                    batch.rows.extend(batch.entries[org_id])
            if batch.rows:
                archived_rows, skipped = await _write_rows(conn, driver, batch.rows)
                archived += archived_rows
        await self.broker.mark_archived([(m, e, o) for m, (e, o) in batch.marks.items()])
        by_stream: dict[str, list[str]] = defaultdict(list)
        for key, entry_id, _fields in entries:
            by_stream[key].append(entry_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            for key, ids in by_stream.items():
                pipe.xack(key, GROUP, *ids)
                pipe.xdel(key, *ids)
            await pipe.execute()
        self.stats.archived += archived
        self.stats.skipped += skipped
        self.stats.batches += 1

    # --- partitions --------------------------------------------------------------------

    async def balance(self) -> None:
        """Heartbeat, keep our leases, and take or give partitions towards a fair share."""
        now_ms = int(time.time() * 1000)
        ttl = self.settings.lease_ms
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.zadd(_WORKERS, {self.consumer: now_ms})
            pipe.zremrangebyscore(_WORKERS, "-inf", now_ms - ttl)
            pipe.zcard(_WORKERS)
            owned = sorted(self.owned)
            for p in owned:
                await self._renew(keys=[_lease_key(p)], args=[self.consumer, ttl], client=pipe)
            _, _, live, *renewed = await pipe.execute()
        for p, ok in zip(owned, renewed, strict=True):
            if not ok:
                log.warning("archive: lost a partition lease", partition=p)
                self.owned.discard(p)
                self._draining.discard(p)
        share = math.ceil(PARTITIONS / max(1, int(live)))
        if len(self.owned) > share:
            await self._give_up(set(sorted(self.owned)[share:]))
            return
        for p in range(PARTITIONS):
            if len(self.owned) >= share:
                break
            if p in self.owned:
                continue
            if await self.redis.set(_lease_key(p), self.consumer, nx=True, px=ttl):
                await self._take(p)

    async def _take(self, partition: int) -> None:
        key = archive_key(partition)
        try:
            await self.redis.xgroup_create(key, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        # Whatever another archiver had read but not written is ours now, to write first.
        start = "0-0"
        while True:
            start, claimed, *_ = await self.redis.xautoclaim(
                key, GROUP, self.consumer, min_idle_time=0, start_id=start, count=1000
            )
            start = start.decode() if isinstance(start, bytes) else start
            if start == "0-0" or not claimed:
                break
        self.owned.add(partition)
        self._draining.add(partition)

    async def _give_up(self, partitions: set[int]) -> None:
        for p in partitions:
            await self._release(keys=[_lease_key(p)], args=[self.consumer])
            self.owned.discard(p)
            self._draining.discard(p)

    async def upkeep(self) -> None:
        """Make the coming days' partitions; drop those past retention."""
        async with self.database.engine.begin() as conn:
            await conn.execute(
                text("SELECT apix_event_ensure_partitions(:days)"), {"days": _DAYS_AHEAD}
            )
            await conn.execute(
                text("SELECT apix_event_drop_partitions(:keep)"),
                {"keep": self.settings.archive_retention_days},
            )


def _row(fields: dict[bytes, bytes] | None) -> dict[str, Any] | None:
    """The `apix_event` row of an archive entry, or None for an entry we cannot read."""
    if not fields:
        return None  # deleted from the stream meanwhile: nothing left to write
    try:
        tenant = fields[b"t"].decode()
        channel = fields[b"c"].decode()
        offset = fields[b"o"].decode()
        event = loads(fields[b"d"])
        ms, seq = offset_key(offset)
        meta = event.get("meta")
        if not isinstance(meta, dict):
            meta = {}  # as PostgreSQL builds it in `_INSERT_EVENTS`
        session_id = meta.get("session_id")
        if session_id is not None and not isinstance(session_id, str):
            session_id = dumps(session_id).decode()  # as `->>` gives it
        namespace, _, key = channel.partition(":")
        return {
            "org_id": uuid.UUID(tenant),
            "channel": channel,
            "epoch": fields[b"e"].decode(),
            "offset_ms": ms,
            "offset_seq": seq,
            # The publish time: part of the key, so a rewrite lands in the same partition.
            "created_at": datetime.fromtimestamp(int(event.get("ts", ms)) / 1000, UTC),
            "id": str(event["id"]),
            "type": str(event["type"])[:100],
            # JSON text, as the jsonb columns take it (a missing `data` is JSON null).
            "payload": dumps(event.get("data")).decode(),
            "metadata": dumps(meta).decode(),
            "session_id": key if namespace == "sessions" else session_id,
        }
    except (KeyError, ValueError, TypeError, AttributeError, OverflowError, OSError):
        log.warning("archive: dropping an unreadable entry")
        return None


@dataclass
class _Batch:
    """Archive entries sorted out for writing."""

    columns: dict[uuid.UUID, list[list[Any]]] = field(default_factory=dict)  # `_INSERT_EVENTS`'s
    entries: dict[uuid.UUID, list[Entry]] = field(default_factory=dict)  # the same, per org
    rows: list[Entry] = field(default_factory=list)  # for `_write_rows`
    marks: dict[str, tuple[str, str]] = field(default_factory=dict)  # meta key → epoch, offset


def _sort(entries: Sequence[Entry]) -> _Batch:
    """Per organisation, the arrays of `_INSERT_EVENTS` (channel, epoch, offset ms, offset
    sequence, event JSON); the entries for the row-by-row path; and each channel's newest
    offset, to mark archived (only from entries whose position reads as one)."""
    batch = _Batch()
    orgs: dict[bytes, uuid.UUID] = {}
    for entry in entries:
        fields = entry[2]
        try:
            assert fields is not None  # noqa: S101 - deleted meanwhile: caught below
            tenant = fields[b"t"]
            org_id = orgs.get(tenant)
            if org_id is None:
                org_id = orgs[tenant] = uuid.UUID(tenant.decode())
            channel, epoch, offset = (fields[k].decode() for k in (b"c", b"e", b"o"))
            ms, seq = offset_key(offset)
            event = fields[b"d"]
        except (AssertionError, KeyError, ValueError):  # UnicodeDecodeError is a ValueError
            batch.rows.append(entry)  # `_row` drops it, and says so
            continue
        if _STREAM_ID.match(offset):
            batch.marks[f"{channel_prefix(str(org_id), channel)}:m"] = (epoch, offset)
        if b"\\u0000" in event:  # JSON's escape of U+0000 (or a false alarm): see `_storable`
            batch.rows.append(entry)
            continue
        columns = batch.columns.get(org_id)
        if columns is None:
            columns = batch.columns[org_id] = [[], [], [], [], []]
            batch.entries[org_id] = []
        columns[0].append(channel)
        columns[1].append(epoch)
        columns[2].append(ms)
        columns[3].append(seq)
        columns[4].append(event.decode())
        batch.entries[org_id].append(entry)
    return batch


async def _write_rows(
    conn: AsyncConnection, driver: asyncpg.Connection, entries: Sequence[Entry]
) -> tuple[int, int]:
    """Entries built into rows here, U+0000 replaced (`_storable`), and written one at a
    time in savepoints: what PostgreSQL still refuses is dropped, with a warning. Returns
    (rows written, entries dropped)."""
    rows: dict[uuid.UUID, list[dict[str, Any]]] = defaultdict(list)
    skipped = archived = 0
    for _key, _entry_id, fields in entries:
        row = _row(fields)
        if row is None:  # logged by `_row`
            skipped += 1
            continue
        rows[row["org_id"]].append(_storable(row))
    for org_id, org_rows in rows.items():
        await _as_tenant(conn, org_id)
        for row in org_rows:
            try:
                async with _savepoint(driver):
                    await driver.execute(_INSERT_ROWS, org_id, *([row[c]] for c in _COLUMNS))
            except _REFUSED as exc:
                skipped += 1
                log.warning(
                    "archive: PostgreSQL refused an event; dropped",
                    channel=row["channel"],
                    offset=f"{row['offset_ms']}-{row['offset_seq']}",
                    error=f"{type(exc).__name__}: {exc}",
                )
                continue
            archived += 1
    return archived, skipped


async def _as_tenant(conn: AsyncConnection, org_id: uuid.UUID) -> None:
    """The archive is under row-level security like every tenant table. (Through SQLAlchemy:
    its first statement is what opens the transaction on the driver's connection.)"""
    await conn.execute(text("SELECT set_config('apix.org_id', :org, true)"), {"org": str(org_id)})


@asynccontextmanager
async def _savepoint(driver: asyncpg.Connection) -> AsyncIterator[None]:
    """A statement that fails inside undoes only itself, not the transaction."""
    await driver.execute("SAVEPOINT apix_archive")
    try:
        yield
    except Exception:
        await driver.execute("ROLLBACK TO SAVEPOINT apix_archive")
        raise
    await driver.execute("RELEASE SAVEPOINT apix_archive")


def _storable(row: dict[str, Any]) -> dict[str, Any]:
    """The row with U+0000, which PostgreSQL's text and jsonb cannot hold, replaced by
    U+FFFD (the publish API refuses it; an event published inside the platform may have it)."""
    out = dict(row)
    for column in ("channel", "epoch", "id", "type", "session_id"):
        value = out[column]
        if isinstance(value, str) and "\x00" in value:
            out[column] = value.replace("\x00", "\ufffd")
    for column in ("payload", "metadata"):
        if "\\u0000" in out[column]:  # JSON's escape of U+0000 (or a false alarm)
            out[column] = dumps(_without_nul(loads(out[column]))).decode()
    return out


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    return value


async def read(
    database: Database,
    channel: ChannelRef,
    *,
    epoch: str,
    after: str,
    upto: str,
    limit: int,
) -> list[StoredEvent]:
    """Archived events of ``channel`` (``epoch``) after ``after`` up to ``upto``, in order."""
    org_id = org_uuid(channel)
    if org_id is None:
        return []
    after_ms, after_seq = offset_key(after)
    upto_ms, upto_seq = offset_key(upto)
    async with database.transaction(org_id) as uow:
        result = await uow.session.execute(
            text(
                "SELECT offset_ms, offset_seq, id, type, created_at, payload, metadata "
                "FROM apix_event WHERE org_id = :org AND channel = :channel AND epoch = :epoch "
                "AND (offset_ms, offset_seq) > (:after_ms, :after_seq) "
                "AND (offset_ms, offset_seq) <= (:upto_ms, :upto_seq) "
                # Publish times trail offsets by moments: this lets old partitions be skipped.
                "AND created_at >= :since "
                "ORDER BY offset_ms, offset_seq LIMIT :limit"
            ),
            {
                "org": org_id,
                "channel": channel.name,
                "epoch": epoch,
                "after_ms": after_ms,
                "after_seq": after_seq,
                "upto_ms": upto_ms,
                "upto_seq": upto_seq,
                "since": datetime.fromtimestamp(after_ms / 1000, UTC) - _CLOCK_SLACK,
                "limit": limit,
            },
        )
        rows = result.all()
    return [
        StoredEvent(
            f"{ms}-{seq}",
            event_payload(event_id, event_type, int(created.timestamp() * 1000), data, meta),
        )
        for ms, seq, event_id, event_type, created, data, meta in rows
    ]


async def backlog(redis: Redis) -> dict[str, Any]:
    """Events not archived yet, the age of the oldest, and the live archivers (status)."""
    now_ms = int(time.time() * 1000)
    async with redis.pipeline(transaction=False) as pipe:
        for p in range(PARTITIONS):
            pipe.xlen(archive_key(p))
            pipe.xrange(archive_key(p), "-", "+", count=1)
        pipe.zcount(_WORKERS, now_ms - 60_000, "+inf")
        *replies, workers = await pipe.execute()
    lengths, heads = replies[0::2], replies[1::2]
    oldest = min((offset_key(head[0][0].decode())[0] for head in heads if head), default=None)
    return {
        "events_behind": int(sum(lengths)),
        "oldest_pending_age_s": None if oldest is None else round((now_ms - oldest) / 1000, 3),
        "archivers": int(workers),
    }

"""Where connections are known: live state in Redis for every node, a durable record in
PostgreSQL written in batches.

Redis holds each connection's hash (`apix:conn:<id>`), each organisation's set of
connection ids, and each node's liveness key; a node refreshes them on a timer. PostgreSQL
gets `apix_connection` and `apix_channel` rows, upserted together every
`registry_flush_s`, one transaction per organisation: never a write per ping or per event.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis
from sqlalchemy import func
from sqlalchemy.dialects.postgresql import insert

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.json import dumps, loads
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.infra.database import Database, driver_of
from apix.infra.redis import AutoPipeline
from apix.realtime.channels import ChannelRef, org_uuid
from apix.realtime.models import ApixChannel

log = get_logger(__name__)

CONTROL_CHANNEL = "apix:control"
_NODE_TTL_S = 30
_CONN_TTL_S = 300
_CONN_REFRESH_S = 60  # connection keys are refreshed this often, the node key every beat
_BULK = 5_000  # commands per bulk exchange: well inside one socket timeout


_NODE_META = RequestMeta()  # written by the node itself, not on behalf of a request
_AUDIT_LIST_MAX = 500  # per list and flush; the rest is counted


def _audit_changes(seen: list[tuple[ConnectionRecord, list[str], bool]]) -> dict[str, Any]:
    """Connections opened and closed, and subscriptions added and removed, since the last
    flush that reached the audit log; ``seen``: (record, its channels, closed) now."""
    opened: list[dict[str, Any]] = []
    closed: list[dict[str, Any]] = []
    subscribed: list[dict[str, Any]] = []
    unsubscribed: list[dict[str, Any]] = []
    for r, channels, closed_now in seen:
        if not r.audited_open:
            opened.append(
                {
                    "connection_id": r.id,
                    "user_id": str(r.user_id) if r.user_id else None,
                    "api_key_id": str(r.api_key_id) if r.api_key_id else None,
                    "client_type": r.client_type,
                }
            )
        added = sorted(set(channels) - set(r.audited_channels))
        removed = sorted(set(r.audited_channels) - set(channels))
        if added:
            subscribed.append({"connection_id": r.id, "channels": added})
        if removed:
            unsubscribed.append({"connection_id": r.id, "channels": removed})
        if closed_now and not r.audited_close:
            closed.append({"connection_id": r.id, "close_code": r.close_code})
    changes: dict[str, Any] = {}
    for name, items in (
        ("opened", opened),
        ("closed", closed),
        ("subscribed", subscribed),
        ("unsubscribed", unsubscribed),
    ):
        if items:
            changes[name] = items[:_AUDIT_LIST_MAX]
            if len(items) > _AUDIT_LIST_MAX:
                changes[f"{name}_more"] = len(items) - _AUDIT_LIST_MAX
    return changes


# One statement for any number of rows, the columns as arrays: SQLAlchemy's executemany
# processed every row and column in Python and sent a new multi-row VALUES per batch size.
# After a storm of 10,000 connects, that insert was 8% of the node's CPU.
_UPSERT_CONNECTIONS = """
INSERT INTO apix_connection (org_id, id, user_id, api_key_id, client_type, client_name,
                             client_version, node, channels, metadata, status, connected_at,
                             last_heartbeat_at, disconnected_at, close_code)
SELECT $1::uuid, r.*
FROM unnest($2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[], $7::text[],
            $8::text[], $9::jsonb[], $10::jsonb[], $11::text[], $12::timestamptz[],
            $13::timestamptz[], $14::timestamptz[], $15::int[]) AS r
ON CONFLICT (id) DO UPDATE SET
    channels = EXCLUDED.channels,
    status = EXCLUDED.status,
    last_heartbeat_at = EXCLUDED.last_heartbeat_at,
    disconnected_at = EXCLUDED.disconnected_at,
    close_code = EXCLUDED.close_code
"""
_ROWS_PER_UPSERT = 5_000


def _connection_columns(records: list[ConnectionRecord]) -> list[list[Any]]:
    """The upsert's arrays, in its column order (after `org_id`)."""
    return [
        [r.id for r in records],
        [r.user_id for r in records],
        [r.api_key_id for r in records],
        [r.client_type for r in records],
        [r.client_name for r in records],
        [r.client_version for r in records],
        [r.node for r in records],
        [dumps(r.channels).decode() for r in records],
        [dumps(r.metadata).decode() for r in records],
        [r.status for r in records],
        [r.connected_at for r in records],
        [r.last_heartbeat_at for r in records],
        [r.disconnected_at for r in records],
        [r.close_code for r in records],
    ]


def _conn_key(connection_id: str) -> str:
    return f"apix:conn:{connection_id}"


def _org_key(org_id: uuid.UUID) -> str:
    return f"apix:org:{org_id}:conns"


def _subscribers_key(org: uuid.UUID, channel: str) -> str:
    return f"apix:org:{org}:subs:{channel}"


def _node_key(node: str) -> str:
    return f"apix:node:{node}"


@dataclass
class ConnectionRecord:
    id: str
    org_id: uuid.UUID
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    client_type: str
    client_name: str | None
    client_version: str | None
    node: str
    connected_at: datetime
    channels: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    status: str = "CONNECTED"
    last_heartbeat_at: datetime | None = None
    disconnected_at: datetime | None = None
    close_code: int | None = None
    rtt_ms: float | None = None
    # What the audit log already holds about this connection (written with each flush).
    audited_open: bool = False
    audited_close: bool = False
    audited_channels: list[str] = field(default_factory=list)

    def public(self) -> dict[str, Any]:
        return {
            "connection_id": self.id,
            "user_id": self.user_id,
            "api_key_id": self.api_key_id,
            "client_type": self.client_type,
            "client_name": self.client_name,
            "client_version": self.client_version,
            "node": self.node,
            "channels": self.channels,
            "connected_at": int(self.connected_at.timestamp() * 1000),
            "rtt_ms": self.rtt_ms,
        }


class Registry:
    def __init__(
        self,
        redis: Redis,
        database: Database,
        *,
        node: str,
        flush_s: float,
        batch: AutoPipeline | None = None,
    ) -> None:
        self.redis = redis
        self.batch = batch or AutoPipeline(redis)
        self.database = database
        self.node = node
        self.flush_s = flush_s
        self._live: dict[str, ConnectionRecord] = {}
        self._dirty: dict[str, ConnectionRecord] = {}
        self._channels: dict[tuple[uuid.UUID, str], str] = {}  # (org, name) → namespace
        self._refreshed_at = 0.0
        # One flush at a time: a flush returns once what was marked before it is written,
        # even when the loop's own flush had taken it and was still writing.
        self._flushing = asyncio.Lock()
        self._loop = Periodic("apix-registry", min(flush_s, _NODE_TTL_S / 3), self._tick)

    async def start(self) -> None:
        await self._beat()
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        await self.flush()
        with contextlib.suppress(Exception):
            await self.redis.delete(_node_key(self.node))

    # --- changes (cheap: memory and a share of one Redis round trip) --------------------
    # They return the write's future: a caller can issue several and then await them all.

    def connected(self, record: ConnectionRecord) -> Awaitable[Any]:
        self._live[record.id] = record
        self._dirty[record.id] = record
        self.batch.send("SET", _conn_key(record.id), self._live_state(record), "EX", _CONN_TTL_S)
        return self.batch.call("SADD", _org_key(record.org_id), record.id)

    def update_live(self, record: ConnectionRecord) -> Awaitable[Any]:
        """Subscriptions changed: every node's connection list shows it at once."""
        self._dirty[record.id] = record
        state = self._live_state(record)
        return self.batch.call("SET", _conn_key(record.id), state, "EX", _CONN_TTL_S)

    def show_live(self, record: ConnectionRecord) -> None:
        """`update_live` without waiting (a failure is logged): the measured latency and the
        heartbeat, shown in the list at once and written to the record at the next flush."""
        self._dirty[record.id] = record
        self.batch.send("SET", _conn_key(record.id), self._live_state(record), "EX", _CONN_TTL_S)

    @staticmethod
    def _live_state(record: ConnectionRecord) -> bytes:
        return dumps(record.public() | {"org_id": record.org_id})

    def subscribed(self, channel: ChannelRef, connection_id: str, on: bool) -> Awaitable[Any]:
        """Count the channel's subscribers (across nodes) and mark its record for update."""
        org = org_uuid(channel)
        if org is None:
            done = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        self._channels[(org, channel.name)] = channel.namespace.name
        key = _subscribers_key(org, channel.name)
        return self.batch.call("SADD" if on else "SREM", key, connection_id)

    async def disconnected(self, record: ConnectionRecord, code: int) -> None:
        record.status = "DISCONNECTED"
        record.disconnected_at = datetime.now(UTC)
        record.close_code = code
        self._live.pop(record.id, None)
        self._dirty[record.id] = record
        with contextlib.suppress(Exception):
            self.batch.send("DEL", _conn_key(record.id))
            await self.batch.call("SREM", _org_key(record.org_id), record.id)

    # --- reading (any node) -------------------------------------------------------------

    async def list_org(self, org_id: uuid.UUID) -> list[dict[str, Any]]:
        members = await self.redis.smembers(_org_key(org_id))
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not ids:
            return []
        async with self.redis.pipeline(transaction=False) as pipe:
            for connection_id in ids:
                pipe.get(_conn_key(connection_id))
            raw = await pipe.execute()
        records = [loads(r) for r in raw if r is not None]
        nodes = sorted({r["node"] for r in records})
        alive_raw = await self.redis.mget([_node_key(n) for n in nodes]) if nodes else []
        alive = {n for n, a in zip(nodes, alive_raw, strict=True) if a is not None}
        # Only records that expired are forgotten: a node key missing for a moment (a Redis
        # restart) must not drop that node's live connections from the index.
        gone = [i for i, r in zip(ids, raw, strict=True) if r is None]
        if gone:
            await self.redis.srem(_org_key(org_id), *gone)
        return [r for r in records if r["node"] in alive]

    async def find(self, org_id: uuid.UUID, connection_id: str) -> dict[str, Any] | None:
        raw = await self.redis.get(_conn_key(connection_id))
        if raw is None:
            return None
        record: dict[str, Any] = loads(raw)
        return record if record.get("org_id") == str(org_id) else None

    async def kick(self, connection_id: str, code: int = 4010) -> None:
        await self.redis.publish(CONTROL_CHANNEL, dumps({"kick": connection_id, "code": code}))

    # --- background ---------------------------------------------------------------------

    async def _tick(self) -> None:
        await self._beat()
        await self.flush()

    async def _beat(self) -> None:
        now = datetime.now(UTC)
        refresh = now.timestamp() - self._refreshed_at >= _CONN_REFRESH_S
        commands: list[tuple[Any, ...]] = [
            ("SET", _node_key(self.node), int(now.timestamp() * 1000), "EX", _NODE_TTL_S)
        ]
        if refresh:  # every connection's key, in bulk exchanges of a few thousand
            commands += [("EXPIRE", _conn_key(i), _CONN_TTL_S) for i in list(self._live)]
        for start in range(0, len(commands), _BULK):
            for reply in await self.batch.execute(commands[start : start + _BULK]):
                if isinstance(reply, Exception):
                    raise reply
        if refresh:
            self._refreshed_at = now.timestamp()

    async def flush(self) -> None:
        """Write every record and channel marked so far to PostgreSQL."""
        async with self._flushing:
            await self._flush()

    async def _flush(self) -> None:
        dirty, self._dirty = self._dirty, {}
        channels, self._channels = self._channels, {}
        by_org: dict[uuid.UUID, list[ConnectionRecord]] = defaultdict(list)
        for record in dirty.values():
            by_org[record.org_id].append(record)
        channels_by_org: dict[uuid.UUID, list[tuple[str, str]]] = defaultdict(list)
        for (org, name), namespace in channels.items():
            channels_by_org[org].append((name, namespace))
        for org in by_org.keys() | channels_by_org.keys():
            try:
                await self._write(org, by_org.get(org, []), channels_by_org.get(org, []))
            except Exception:
                # Keep what failed for the next round rather than losing it.
                for record in by_org.get(org, []):
                    self._dirty.setdefault(record.id, record)
                raise

    async def _write(
        self, org: uuid.UUID, records: list[ConnectionRecord], channels: list[tuple[str, str]]
    ) -> None:
        # What the audit event will say, as of now: records keep changing while we write.
        seen = [(r, list(r.channels), r.disconnected_at is not None) for r in records]
        await self._upsert(org, records, channels, _audit_changes(seen))
        for record, channels_seen, closed_seen in seen:  # committed: the log holds these
            record.audited_open = True
            record.audited_close = closed_seen
            record.audited_channels = channels_seen

    async def _upsert(
        self,
        org: uuid.UUID,
        records: list[ConnectionRecord],
        channels: list[tuple[str, str]],
        changes: dict[str, Any],
    ) -> None:
        async with self.database.transaction(org) as uow:
            if changes:
                # One audit event per organisation and flush, not one per connection.
                await audit.record(
                    uow,
                    "realtime.connections",
                    meta=_NODE_META,
                    org_id=org,
                    target_type="apix_connection",
                    details={"node": self.node, **changes},
                )
            if records:
                driver = await driver_of(await uow.session.connection())
                for start in range(0, len(records), _ROWS_PER_UPSERT):
                    chunk = records[start : start + _ROWS_PER_UPSERT]
                    await driver.execute(_UPSERT_CONNECTIONS, org, *_connection_columns(chunk))
            if channels:
                now = datetime.now(UTC)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for name, _ in channels:
                        pipe.scard(_subscribers_key(org, name))
                    counts = [int(c) for c in await pipe.execute()]
                stmt = insert(ApixChannel)
                await uow.session.execute(
                    stmt.on_conflict_do_update(
                        index_elements=[ApixChannel.org_id, ApixChannel.name],
                        set_={
                            "last_active_at": func.now(),
                            "subscriber_count": stmt.excluded.subscriber_count,
                        },
                    ),
                    [
                        {
                            "org_id": org,
                            "name": name,
                            "namespace": ns,
                            "subscriber_count": count,
                            "last_active_at": now,
                        }
                        for (name, ns), count in zip(channels, counts, strict=True)
                    ],
                )

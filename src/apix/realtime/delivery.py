"""Delivery guarantees: acknowledged delivery with redelivery, resumable sessions, dead letters.

- Every event sent to an `ack: true` subscription gets an entry in this node's Redis sorted
  set of due times (`apix:redeliver:<node>`); entries are added and removed in batches.
  One loop per node takes what is due: acknowledged entries are dropped, the others are
  sent again with `attempt` + 1 on the backoff, and after `max_attempts` the event is
  dead-lettered (PostgreSQL) and `message.failed` is published on `monitor`. Nothing runs
  per message while nothing is due.
- A session (the `session` token of `connection.established`) is kept in Redis: the
  principal it belongs to and each subscription's filter and positions (last delivered;
  last acknowledged for `ack` subscriptions). Saved on every change of subscriptions or
  acknowledgements, every few seconds for positions, and exactly when the socket closes;
  it lives `resume_window_s` after that.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from sqlalchemy import update

from apix.config import RealtimeSettings
from apix.core.json import dumps, loads
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.identity.principal import Principal
from apix.infra.database import Database
from apix.infra.redis import AutoPipeline
from apix.realtime.broker import Broker, event_frame, offset_key
from apix.realtime.channels import ChannelRef, org_uuid
from apix.realtime.hub import Subscription
from apix.realtime.models import ApixDeadLetter, ApixEvent

if TYPE_CHECKING:
    from apix.realtime.gateway import ClientConnection

log = get_logger(__name__)

_TICK_S = 0.1
_KEY_TTL_S = 86_400  # a process's redelivery set outlives its last write by a day
_BATCH = 500
_POSITION_SAVE_S = 5.0


def new_session_token() -> str:
    return f"ses_{secrets.token_urlsafe(24)}"


def _session_key(token: str) -> str:
    return f"apix:sess:{token}"


@dataclass(frozen=True, slots=True)
class SavedSubscription:
    channel: str
    types: list[str] | None
    presence: bool
    ack: bool
    offset: str
    epoch: str
    acked: str


@dataclass(frozen=True, slots=True)
class SavedSession:
    org_id: str
    user_id: str | None
    api_key_id: str | None
    subscriptions: list[SavedSubscription]

    def belongs_to(self, principal: Principal) -> bool:
        return (self.org_id, self.user_id, self.api_key_id) == (
            str(principal.org_id),
            str(principal.user_id) if principal.user_id else None,
            str(principal.api_key_id) if principal.api_key_id else None,
        )


class Sessions:
    """Resumable sessions in Redis."""

    def __init__(
        self, redis: Redis, config: RealtimeSettings, batch: AutoPipeline | None = None
    ) -> None:
        self.redis = redis
        self.batch = batch or AutoPipeline(redis)
        self.window_s = config.resume_window_s

    async def load(self, token: str) -> SavedSession | None:
        raw = await self.batch.call("GET", _session_key(token))
        if raw is None:
            return None
        data = loads(raw)
        return SavedSession(
            org_id=data["org_id"],
            user_id=data["user_id"],
            api_key_id=data["api_key_id"],
            subscriptions=[SavedSubscription(**s) for s in data["subscriptions"]],
        )

    async def save_snapshot(self, token: str, snapshot: bytes) -> None:
        """Save a session captured at close (its positions exact), for the resume window."""
        await self.batch.call("SET", _session_key(token), snapshot, "EX", self.window_s)

    def save(
        self, connections: Iterable[ClientConnection], *, closing: bool = False
    ) -> Awaitable[Any]:
        # While connected a session must outlive a node crash by the resume window.
        ttl = self.window_s + (0 if closing else int(_POSITION_SAVE_S) * 3)
        return asyncio.gather(
            *(
                self.batch.call("SET", _session_key(c.session), snapshot(c), "EX", ttl)
                for c in connections
                if c.principal is not None
            )
        )


def snapshot(connection: ClientConnection) -> bytes:
    principal = connection.principal
    assert principal is not None  # noqa: S101
    return dumps(
        {
            "org_id": str(principal.org_id),
            "user_id": str(principal.user_id) if principal.user_id else None,
            "api_key_id": str(principal.api_key_id) if principal.api_key_id else None,
            "subscriptions": [
                {
                    "channel": sub.channel.name,
                    "types": connection.filters.get(sub.channel.name),
                    "presence": sub.presence,
                    "ack": sub.ack,
                    "offset": sub.last_offset,
                    "epoch": sub.epoch,
                    "acked": sub.acked,
                }
                for sub in connection.subscriptions.values()
            ],
        }
    )


class Redelivery:
    """This node's acknowledgement bookkeeping and redelivery loop."""

    def __init__(
        self,
        redis: Redis,
        database: Database,
        broker: Broker,
        config: RealtimeSettings,
        *,
        node: str,
        connections: dict[str, ClientConnection],
        on_failed: Callable[[ChannelRef, Principal | None, dict[str, Any]], Any],
    ) -> None:
        self.redis = redis
        self.database = database
        self.broker = broker
        self.config = config
        # One set per gateway process: `apix serve --workers N` runs N gateways under one
        # node name, and each must redeliver only to its own connections. A set a process
        # left behind (a crash) names connections that died with it: it expires.
        self.key = f"apix:redeliver:{node}:{secrets.token_hex(6)}"
        self.connections = connections
        self.on_failed = on_failed
        self._adds: dict[str, float] = {}
        self._removes: list[str] = []
        # When the earliest pending redelivery falls due (epoch seconds): until then a tick
        # asks Redis nothing, so an idle node or one without `ack` subscriptions does not
        # query ten times a second.
        self._next_due = math.inf
        self._loop = Periodic("apix-redelivery", _TICK_S, self._tick)

    async def start(self) -> None:
        self._loop.start()

    async def stop(self) -> None:
        await self._loop.stop()
        with contextlib.suppress(Exception):
            await self._flush()

    # --- hot path: memory only -----------------------------------------------------------

    def delivered(self, sub: Subscription, offset: str, attempt: int = 1) -> None:
        """Called for every event sent to an `ack` subscription."""
        member = f"{sub.connection_id}|{sub.channel.name}|{offset}|{attempt}"
        previous = sub.pending.get(offset)
        if previous is not None:
            self._removes.append(previous)
            self._adds.pop(previous, None)
        sub.pending[offset] = member
        due = self._adds[member] = time.time() + self._wait_after(attempt)
        if due < self._next_due:
            self._next_due = due

    def acknowledged(self, sub: Subscription, offset: str) -> None:
        """Cumulative: acknowledges ``offset`` and every earlier event."""
        if offset_key(offset) <= offset_key(sub.acked):
            return
        sub.acked = offset
        floor = offset_key(offset)
        for pending in [o for o in sub.pending if offset_key(o) <= floor]:
            member = sub.pending.pop(pending)
            if self._adds.pop(member, None) is None:
                self._removes.append(member)

    def forget(self, sub: Subscription) -> None:
        for member in sub.pending.values():
            if self._adds.pop(member, None) is None:
                self._removes.append(member)
        sub.pending.clear()

    def _wait_after(self, attempt: int) -> float:
        backoff = self.config.redelivery_backoff_ms
        extra = 0.0
        if attempt < self.config.max_attempts and backoff:
            extra = backoff[min(attempt, len(backoff)) - 1] / 1000 * random.uniform(0.8, 1.2)  # noqa: S311 - jitter, not security
        return self.config.ack_timeout_ms / 1000 + extra

    # --- the loop ----------------------------------------------------------------------------

    async def _tick(self) -> None:
        await self._flush()
        if time.time() >= self._next_due:
            await self._due()

    async def _flush(self) -> None:
        adds, self._adds = self._adds, {}
        removes, self._removes = self._removes, []
        if not adds and not removes:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            if removes:
                pipe.zrem(self.key, *removes)
            if adds:
                pipe.zadd(self.key, {m: int(due * 1000) for m, due in adds.items()})
                pipe.expire(self.key, _KEY_TTL_S)
            await pipe.execute()

    async def _due(self) -> None:
        now_ms = int(time.time() * 1000)
        due = await self.redis.zrangebyscore(self.key, 0, now_ms, start=0, num=_BATCH)
        done: list[str] = []
        for raw in due:
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            done.append(member)
            connection_id, channel_name, offset, attempt_s = member.rsplit("|", 3)
            connection = self.connections.get(connection_id)
            sub = connection.subscriptions.get(channel_name) if connection else None
            if connection is None or sub is None or not sub.ack:
                continue
            if sub.pending.get(offset) != member or offset_key(offset) <= offset_key(sub.acked):
                continue
            del sub.pending[offset]
            attempt = int(attempt_s)
            snapshot = await self.broker.read(sub.channel, after=offset_before(offset), limit=1)
            event = snapshot.events[0] if snapshot.events else None
            if event is None or event.offset != offset:
                continue  # trimmed away meanwhile: nothing left to send
            if attempt >= self.config.max_attempts:
                await self._dead_letter(
                    connection, sub, event.offset, snapshot.epoch, event.payload, attempt
                )
                continue
            frame = event_frame(
                sub.channel.name, offset, snapshot.epoch, event.payload, attempt + 1
            )
            connection.queue.push_unbounded(frame)
            self.delivered(sub, offset, attempt + 1)
        async with self.redis.pipeline(transaction=False) as pipe:
            if done:
                pipe.zrem(self.key, *done)
            pipe.zrange(self.key, 0, 0, withscores=True)
            *_, earliest = await pipe.execute()
        # What is not flushed yet (redeliveries just made among it) is still in `_adds`.
        self._next_due = min(
            [earliest[0][1] / 1000 if earliest else math.inf, *self._adds.values()]
        )

    async def _dead_letter(
        self,
        connection: ClientConnection,
        sub: Subscription,
        offset: str,
        epoch: str,
        payload: bytes,
        attempts: int,
    ) -> None:
        org_id = org_uuid(sub.channel)
        principal = connection.principal
        event = loads(payload)
        if org_id is not None:
            async with self.database.transaction(org_id) as uow:
                row = ApixDeadLetter(
                    org_id=org_id,
                    channel=sub.channel.name,
                    offset=offset,
                    epoch=epoch,
                    event_id=event["id"],
                    type=event["type"],
                    event={"channel": sub.channel.name, "offset": offset, "epoch": epoch, **event},
                    connection_id=connection.id,
                    user_id=principal.user_id if principal else None,
                    attempts=attempts,
                    status="pending",
                    failed_at=datetime.now(UTC),
                )
                uow.session.add(row)
                await uow.session.flush()
                dead_letter_id: uuid.UUID | None = row.id
                # The archived copy records the failure too (when the archiver has written
                # it already: it is normally seconds ahead of the first ack timeout).
                ms, seq = offset_key(offset)
                await uow.session.execute(
                    update(ApixEvent)
                    .where(
                        ApixEvent.org_id == org_id,
                        ApixEvent.channel == sub.channel.name,
                        ApixEvent.epoch == epoch,
                        ApixEvent.offset_ms == ms,
                        ApixEvent.offset_seq == seq,
                    )
                    .values(ack_state="dead_lettered", retry_count=attempts)
                )
        else:
            dead_letter_id = None
        await self.on_failed(
            sub.channel,
            principal,
            {
                "dead_letter_id": str(dead_letter_id) if dead_letter_id else None,
                "channel": sub.channel.name,
                "offset": offset,
                "event_id": event["id"],
                "type": event["type"],
                "connection_id": connection.id,
                "attempts": attempts,
            },
        )


def offset_before(offset: str) -> str:
    """The stream id just before ``offset`` (for an exclusive range that starts at it)."""
    ms, seq = offset_key(offset)
    return f"{ms}-{seq - 1}" if seq > 0 else f"{ms - 1}-18446744073709551615"

"""The broker: one Redis stream per channel, its epoch, and the live announcement.

Appending and announcing happen in one Lua script, so no event gets an offset without being
announced to every node, and announcements arrive in offset order. The stream keeps the
namespace's last N events for at most its maximum age; the script remembers the newest
trimmed offset, so a reader can tell whether a position is still fully covered.
"""

from __future__ import annotations

import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from apix.core.json import dumps
from apix.realtime.channels import ChannelRef

# KEYS: meta, stream, idempotency key (or ""). ARGV: epoch candidate, max_len, min_id, payload,
# pubsub channel, ttl_ms, event type, event id, idempotency ttl_ms.
# Returns {offset, epoch, event id, duplicate (0/1)}.
_PUBLISH = """
local meta, stream, idem = KEYS[1], KEYS[2], KEYS[3]
if idem ~= '' then
  local first = redis.call('HMGET', idem, 'offset', 'epoch', 'id')
  if first[1] then
    return {first[1], first[2], first[3], 1}
  end
end
local epoch = redis.call('HGET', meta, 'epoch')
local lost = redis.call('EXISTS', stream) == 0 and redis.call('HEXISTS', meta, 'last') == 1
if (not epoch) or lost then
  epoch = ARGV[1]
  redis.call('DEL', meta, stream)
  redis.call('HSET', meta, 'epoch', epoch)
end
local max_len = tonumber(ARGV[2])
local len = redis.call('XLEN', stream)
if len >= max_len then
  local victims = redis.call('XRANGE', stream, '-', '+', 'COUNT', len - max_len + 1)
  redis.call('HSET', meta, 'trimmed', victims[#victims][1])
  redis.call('XTRIM', stream, 'MAXLEN', max_len - 1)
end
local old = redis.call('XREVRANGE', stream, '(' .. ARGV[3], '-', 'COUNT', 1)
if #old > 0 then
  redis.call('HSET', meta, 'trimmed', old[1][1])
  redis.call('XTRIM', stream, 'MINID', ARGV[3])
end
local id = redis.call('XADD', stream, '*', 'd', ARGV[4])
redis.call('HSET', meta, 'last', id)
redis.call('PEXPIRE', stream, ARGV[6])
redis.call('PEXPIRE', meta, ARGV[6])
redis.call('PUBLISH', ARGV[5], 'e ' .. epoch .. ' ' .. id .. ' ' .. ARGV[7] .. ' ' .. ARGV[4])
if idem ~= '' then
  redis.call('HSET', idem, 'offset', id, 'epoch', epoch, 'id', ARGV[8])
  redis.call('PEXPIRE', idem, ARGV[9])
end
return {id, epoch, ARGV[8], 0}
"""

# KEYS: meta, stream. ARGV: epoch candidate, ttl_ms. Returns {epoch, trimmed or false}: the
# channel's epoch, a new one if there was none or the stream was lost since the last publish
# (the same rule the publish script applies, so readers and writers agree on the epoch).
_EPOCH = """
local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
local lost = redis.call('EXISTS', stream) == 0 and redis.call('HEXISTS', meta, 'last') == 1
if (not epoch) or lost then
  epoch = ARGV[1]
  redis.call('DEL', meta)
  redis.call('HSET', meta, 'epoch', epoch)
  redis.call('PEXPIRE', meta, ARGV[2])
end
return {epoch, redis.call('HGET', meta, 'trimmed') or false}
"""

# A publish retried with the same idempotency key within this returns the first result.
IDEMPOTENCY_TTL_S = 600

# Idle channels keep their metadata a while after their events have aged out.
_EXTRA_TTL_MS = 24 * 3600 * 1000


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


def new_event_id() -> str:
    return f"evt_{uuid.uuid4().hex}"


def offset_key(offset: str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence), not as text."""
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Published:
    offset: str
    epoch: str
    id: str
    ts: int
    duplicate: bool = False


@dataclass(frozen=True, slots=True)
class StoredEvent:
    offset: str
    payload: bytes  # {"id", "type", "ts", "data", "meta"} as JSON

    @property
    def type(self) -> str:
        # The type is the second field of every payload we write; avoid a full parse.
        start = self.payload.index(b'"type":"') + 8
        return self.payload[start : self.payload.index(b'"', start)].decode()


@dataclass(frozen=True, slots=True)
class Snapshot:
    epoch: str
    last_offset: str  # "0-0" for an empty channel
    trimmed: str | None  # newest offset dropped from the stream, if any
    events: Sequence[StoredEvent]

    def covers(self, offset: str, epoch: str | None) -> bool:
        """Whether every event after ``offset`` (of ``epoch``) is still in the stream."""
        if epoch is not None and epoch != self.epoch:
            return False
        return self.trimmed is None or offset_key(offset) >= offset_key(self.trimmed)


def event_payload(
    event_id: str, event_type: str, ts: int, data: Any, meta: dict[str, Any]
) -> bytes:
    return dumps({"id": event_id, "type": event_type, "ts": ts, "data": data, "meta": meta})


def event_frame(channel: str, offset: str, epoch: str, payload: bytes, attempt: int = 1) -> str:
    """The `event` frame, built by concatenation: the payload is serialised only once."""
    return (
        f'{{"op":"event","channel":"{channel}","offset":"{offset}","epoch":"{epoch}",'
        f'{payload[1:-1].decode()},"attempt":{attempt}}}'
    )


class Broker:
    def __init__(self, redis: Redis, *, source: str) -> None:
        self.redis = redis
        self.source = source
        self._publish = redis.register_script(_PUBLISH)
        self._epoch = redis.register_script(_EPOCH)

    async def publish(
        self,
        channel: ChannelRef,
        event_type: str,
        data: Any,
        *,
        meta: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> Published:
        """Append and announce an event.

        With ``idempotency_key``, the same key on the same channel within
        `IDEMPOTENCY_TTL_S` returns the first result (``duplicate``) and stores nothing:
        the check and the append are one script, so concurrent retries on any node agree.
        """
        event_id = new_event_id()
        ts = int(time.time() * 1000)
        payload = event_payload(
            event_id,
            event_type,
            ts,
            data,
            {"source": self.source, "version": "1", **(meta or {})},
        )
        namespace = channel.namespace
        min_id = f"{ts - namespace.max_age_s * 1000}-0"
        ttl_ms = namespace.max_age_s * 1000 + _EXTRA_TTL_MS
        idem = channel.idempotency_key(idempotency_key) if idempotency_key else ""
        offset, epoch, stored_id, duplicate = await self._publish(
            keys=[channel.meta_key, channel.stream_key, idem],
            args=[
                new_epoch(),
                namespace.max_len,
                min_id,
                payload,
                channel.pubsub_channel,
                ttl_ms,
                event_type,
                event_id,
                IDEMPOTENCY_TTL_S * 1000,
            ],
        )
        return Published(offset.decode(), epoch.decode(), stored_id.decode(), ts, bool(duplicate))

    async def epoch(self, channel: ChannelRef) -> str:
        ttl_ms = channel.namespace.max_age_s * 1000 + _EXTRA_TTL_MS
        epoch, _ = await self._epoch(
            keys=[channel.meta_key, channel.stream_key], args=[new_epoch(), ttl_ms]
        )
        return str(epoch.decode())

    async def read(
        self,
        channel: ChannelRef,
        *,
        after: str | None = None,
        last: int | None = None,
        limit: int | None = None,
        reverse: bool = False,
    ) -> Snapshot:
        """Events after ``after`` (or the ``last`` N, or none), with the channel's position.

        Metadata and range come from one MULTI, so they describe the same moment.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            ttl_ms = channel.namespace.max_age_s * 1000 + _EXTRA_TTL_MS
            await self._epoch(
                keys=[channel.meta_key, channel.stream_key],
                args=[new_epoch(), ttl_ms],
                client=pipe,
            )
            pipe.xrevrange(channel.stream_key, "+", "-", count=1)
            if after is not None:
                if reverse:
                    pipe.xrevrange(channel.stream_key, "+", f"({after}", count=limit)
                else:
                    pipe.xrange(channel.stream_key, f"({after}", "+", count=limit)
            elif last:
                pipe.xrevrange(channel.stream_key, "+", "-", count=last)
            meta, newest, *rest = await pipe.execute()
        epoch_raw, trimmed_raw = meta
        epoch = epoch_raw.decode()
        entries = rest[0] if rest else []
        if (after is None and last) or (after is not None and reverse):
            entries = entries if reverse else list(reversed(entries))
        events = [StoredEvent(entry_id.decode(), fields[b"d"]) for entry_id, fields in entries]
        return Snapshot(
            epoch=epoch,
            last_offset=newest[0][0].decode() if newest else "0-0",
            trimmed=trimmed_raw.decode() if trimmed_raw else None,
            events=events,
        )

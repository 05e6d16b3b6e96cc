"""The broker: one Redis stream per channel, its epoch, and the live announcement.

Appending and announcing happen in one Lua script, so no event gets an offset without being
announced to every node, and announcements arrive in offset order. The stream keeps the
namespace's last N events for at most its maximum age; the script remembers the newest
trimmed offset, so a reader can tell whether a position is still fully covered.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from apix.core.json import dumps
from apix.infra.redis import AutoPipeline
from apix.realtime.channels import PARTITIONS, ChannelRef, counter_key

# Stream ids compare as (milliseconds, sequence); `older(a, b)` is a < b.
_IDS = """
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function older(a, b)
  local ams, aseq = parse(a)
  local bms, bseq = parse(b)
  return ams < bms or (ams == bms and aseq < bseq)
end
"""

# Shared by the publish scripts. KEYS[1] meta, KEYS[2] stream; ARGV[1] epoch candidate,
# ARGV[2] max_len, ARGV[3] min_id.
#
# The channel's metadata in one read, and its epoch: a new one if there was none or the
# stream was lost since the last publish (it has a `last` event, but no stream; `XLEN` is 0
# for a missing stream, so `EXISTS` is asked only then). Every `redis.call` costs a script
# about a microsecond of Redis's time beyond the command itself, so a publish makes as few
# as it can: the fields it changes are written at the end in one `HSET` (`fields`).
_OPEN_STREAM = """
local state = redis.call('HMGET', meta, 'epoch', 'last', 'archived', 'trimmed', 'oldest', 'ttl')
local epoch, trimmed, oldest, refreshed = state[1], state[4], state[5], state[6]
-- A publish that does not archive (`archive` is "") is not held back by an old mark.
local archived = archive ~= '' and state[3]
local len = redis.call('XLEN', stream)
if (not epoch) or (len == 0 and state[2] and redis.call('EXISTS', stream) == 0) then
  epoch = ARGV[1]
  redis.call('DEL', meta, stream)
  redis.call('HSET', meta, 'epoch', epoch)
  archived, trimmed, oldest, refreshed, len = false, false, false, false, 0
end
local fields = {}
"""

# Trimming, with `incoming` events appended or still to append, keeps the namespace's last
# `max_len` events younger than `min_id`, but never drops an event the archiver has not
# written yet (`archived` in the metadata): with an archive, `trimmed` never passes
# `archived`, so whatever left the stream is in PostgreSQL. A channel that is not archived
# (`archive` is "": `monitor`, `system`) is trimmed by count and age alone.
#
# By count, a stream is cut back to `max_len` once it holds more than 1/128 over it (as
# Redis's own `MAXLEN ~` trims in whole nodes): a channel at its limit pays for the cut once
# every `max_len / 128` publishes, not on each (once in 8 at 1,000 events); a limit under 128
# is kept exactly.
#
# The age check reads the stream's first event only when it may have aged: `oldest` is the
# first event the last check found young, and trimming only ever makes the first event
# younger, so while `min_id` is older than `oldest` nothing is past the age limit.
_TRIM = """
-- With an archive, nothing it does not hold yet may go: no trimming before its first mark,
-- and never past `archived`. Only events up to that mark are read to find the cut, so a
-- publish stays cheap however far the archiver has fallen behind.
local cut = nil
if archive == '' or archived then
  local max_len = tonumber(ARGV[2])
  local over = len - max_len + incoming
  if over > math.floor(max_len / 128) then
    local victims = redis.call('XRANGE', stream, '-', archived or '+', 'COUNT', over)
    if #victims > 0 then
      cut = victims[#victims][1]
    end
  end
  if (not oldest) or not older(ARGV[3], oldest) then
    -- Only when the oldest event is past the age limit: a reverse range that matches
    -- nothing makes Redis walk the whole stream backwards (260 µs a publish at 8,000
    -- events).
    local first = redis.call('XRANGE', stream, '-', '+', 'COUNT', 1)
    if #first > 0 and older(first[1][1], ARGV[3]) then
      local old = redis.call('XREVRANGE', stream, '(' .. ARGV[3], '-', 'COUNT', 1)
      if #old > 0 and (cut == nil or older(cut, old[1][1])) then
        cut = old[1][1]
      end
    elseif #first > 0 then
      fields[#fields + 1], fields[#fields + 2] = 'oldest', first[1][1]
    end
  end
  if cut and archived and older(archived, cut) then
    cut = archived
  end
end
if cut and ((not trimmed) or older(trimmed, cut)) then
  fields[#fields + 1], fields[#fields + 2] = 'trimmed', cut
  local ms, seq = parse(cut)
  redis.call('XTRIM', stream, 'MINID', ms .. '-' .. (seq + 1))
end
"""

# The end of both publish scripts, once `last` (the newest offset) is known: the metadata's
# changes in one write, and the keys' time to live (ARGV[ttl]) renewed, but only when a
# sixty-fourth of it has passed since it last was (the `ttl` field: the stream's time then),
# which keeps both keys for at least 63/64 of it after the last publish.
_CLOSE_STREAM = """
fields[#fields + 1], fields[#fields + 2] = 'last', last
local now = parse(last)
if (not refreshed) or now - tonumber(refreshed) >= tonumber(ARGV[ttl]) / 64 then
  fields[#fields + 1], fields[#fields + 2] = 'ttl', now
  redis.call('PEXPIRE', stream, ARGV[ttl])
  redis.call('PEXPIRE', meta, ARGV[ttl])
end
redis.call('HSET', meta, unpack(fields))
"""

# The published-events counter (KEYS `counter`, "" for none) of `n` events: taken by the
# monitoring lease holder every few seconds; counts nobody took for ten minutes are stale.
# Its time to live is set when a channel's count starts, since a taker empties the whole key.
_COUNT = """
if counter ~= '' then
  if redis.call('HINCRBY', counter, tenant .. ' ' .. name, n) == n then
    redis.call('PEXPIRE', counter, 600000)
  end
end
"""

# KEYS: meta, stream, idempotency key (or ""), archive queue (or "": not archived),
# published-events counter (or "": not counted).
# ARGV: epoch candidate, max_len, min_id, payload, pubsub channel, ttl_ms, event type,
# event id, idempotency ttl_ms, tenant, channel name.
# Returns "offset epoch", or "offset epoch id" (the first publish's event id) for a duplicate:
# one string, as a table of four cost Redis about 7 µs more a publish to build and send (and
# the node to read): `python -m bench.redis_cost --against`.
_PUBLISH = (
    _IDS
    + """
local meta, stream, idem, archive, counter = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local ttl, tenant, name, n = 6, ARGV[10], ARGV[11], 1
if idem ~= '' then
  local first = redis.call('HMGET', idem, 'offset', 'epoch', 'id')
  if first[1] then
    return first[1] .. ' ' .. first[2] .. ' ' .. first[3]
  end
end
"""
    + _OPEN_STREAM
    + "local incoming = 1\n"
    + _TRIM
    + """local id = redis.call('XADD', stream, '*', 'd', ARGV[4])
local last = id
"""
    + _CLOSE_STREAM
    + """
redis.call('PUBLISH', ARGV[5], 'e ' .. epoch .. ' ' .. id .. ' ' .. ARGV[7] .. ' ' .. ARGV[4])
if archive ~= '' then
  redis.call('XADD', archive, '*', 't', tenant, 'c', name, 'e', epoch, 'o', id, 'd', ARGV[4])
end
"""
    + _COUNT
    + """if idem ~= '' then
  redis.call('HSET', idem, 'offset', id, 'epoch', epoch, 'id', ARGV[8])
  redis.call('PEXPIRE', idem, ARGV[9])
end
return id .. ' ' .. epoch
"""
)

# KEYS: meta, stream, archive queue (or ""), published-events counter (or "").
# ARGV: epoch candidate, max_len, min_id, pubsub channel, ttl_ms, tenant, channel name, then
# (payload, event type) for each event, appended and announced in order. Returns the epoch
# and the events' offsets, in one string: "epoch offset offset ...".
_PUBLISH_MANY = (
    _IDS
    + """
local meta, stream, archive, counter = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, tenant, name = 5, ARGV[6], ARGV[7]
"""
    + _OPEN_STREAM
    + """
local ids = {}
for i = 8, #ARGV, 2 do
  local id = redis.call('XADD', stream, '*', 'd', ARGV[i])
  ids[#ids + 1] = id
  redis.call('PUBLISH', ARGV[4], 'e ' .. epoch .. ' ' .. id .. ' ' .. ARGV[i + 1] .. ' ' .. ARGV[i])
  if archive ~= '' then
    redis.call('XADD', archive, '*', 't', tenant, 'c', name, 'e', epoch, 'o', id, 'd', ARGV[i])
  end
end
-- Trimmed after appending: a batch longer than the room left keeps only its newest.
local incoming, last, n = #ids, ids[#ids], #ids
"""
    + _TRIM
    + _CLOSE_STREAM
    + _COUNT
    + """return epoch .. ' ' .. table.concat(ids, ' ')
"""
)

# KEYS: meta, stream. ARGV: epoch candidate, ttl_ms. The channel's epoch: a new one if there
# was none or the stream was lost since the last publish (the same rule the publish script
# applies, so readers and writers agree on the epoch).
_EPOCH_OF = """
local meta, stream = KEYS[1], KEYS[2]
local state = redis.call('HMGET', meta, 'epoch', 'last', 'trimmed', 'archived')
local epoch, trimmed, archived = state[1], state[3] or false, state[4] or false
if (not epoch) or (state[2] and redis.call('XLEN', stream) == 0
                   and redis.call('EXISTS', stream) == 0) then
  epoch = ARGV[1]
  redis.call('DEL', meta)
  redis.call('HSET', meta, 'epoch', epoch)
  redis.call('PEXPIRE', meta, ARGV[2])
  trimmed, archived = false, false
end
"""

# Returns {epoch, trimmed or false, archived or false}.
_EPOCH = (
    _EPOCH_OF
    + """
return {epoch, trimmed, archived}
"""
)

# The channel's position and a range of its events, at one moment (a script is atomic).
# ARGV beyond the epoch's: range ('' none, 'after', 'after-reverse', 'last'), the offset
# the range starts after, count (0: no limit). Returns {epoch, trimmed or false, archived
# or false, newest offset or false, entries}.
_READ = (
    _EPOCH_OF
    + """
local newest = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
local range, limit = ARGV[3], {}
if ARGV[5] ~= '0' then
  limit = {'COUNT', ARGV[5]}
end
local entries = {}
if range == 'after' then
  entries = redis.call('XRANGE', stream, '(' .. ARGV[4], '+', unpack(limit))
elseif range == 'after-reverse' then
  entries = redis.call('XREVRANGE', stream, '+', '(' .. ARGV[4], unpack(limit))
elseif range == 'last' then
  entries = redis.call('XREVRANGE', stream, '+', '-', unpack(limit))
end
return {epoch, trimmed, archived, newest[1] and newest[1][1] or false, entries}
"""
)

# KEYS: meta. ARGV: epoch, offset. The archiver has written every event of this epoch up to
# `offset`: raise `archived` (never lower it, never across an epoch change).
_ARCHIVED = (
    _IDS
    + """
if redis.call('HGET', KEYS[1], 'epoch') ~= ARGV[1] then
  return 0
end
local archived = redis.call('HGET', KEYS[1], 'archived')
if (not archived) or older(archived, ARGV[2]) then
  redis.call('HSET', KEYS[1], 'archived', ARGV[2])
end
return 1
"""
)

# KEYS: a partition's published-events counter. Its counts, {"<tenant> <channel>", n, ...},
# handed over once: the counter is emptied.
_TAKE_COUNTS = """
local counts = redis.call('HGETALL', KEYS[1])
if #counts > 0 then
  redis.call('DEL', KEYS[1])
end
return counts
"""

# A publish retried with the same idempotency key within this returns the first result.
IDEMPOTENCY_TTL_S = 600

# Idle channels keep their metadata a while after their events have aged out.
_EXTRA_TTL_MS = 24 * 3600 * 1000


def new_epoch() -> str:
    return secrets.token_urlsafe(6)


def new_event_id() -> str:
    # 128 random bits as 32 hex digits, as `uuid4().hex` gives, without building a UUID.
    return f"evt_{os.urandom(16).hex()}"


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
    archived: str | None = None  # newest offset the archive holds every event up to

    def covers(self, offset: str, epoch: str | None) -> bool:
        """Whether every event after ``offset`` (of ``epoch``) is still in the stream."""
        if epoch is not None and epoch != self.epoch:
            return False
        return self.trimmed is None or offset_key(offset) >= offset_key(self.trimmed)

    def archive_covers(self, epoch: str | None) -> bool:
        """Whether the archive holds everything the stream dropped (of ``epoch``)."""
        return (
            (epoch is None or epoch == self.epoch)
            and self.trimmed is not None
            and self.archived is not None
            and offset_key(self.archived) >= offset_key(self.trimmed)
        )


def _payload(fields: list[bytes]) -> bytes:
    """The event of a stream entry read by a script: its fields come as a flat list."""
    return fields[fields.index(b"d") + 1]


class UnstorableData(ValueError):
    """Event data PostgreSQL cannot store: U+0000 in a string (a key or a value)."""


def _has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, list):
        return any(_has_nul(v) for v in value)
    if isinstance(value, dict):
        return any(_has_nul(k) or _has_nul(v) for k, v in value.items())
    return False


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


_FRAME_HEAD = '{"op":"event","channel":"'
_OFFSET_FIELD = '","offset":"'


def event_position(frame: str) -> tuple[str, tuple[int, int]] | None:
    """(channel, offset) of an `event` frame built by `event_frame`; None for other frames
    (replies, presence events, which have no offset)."""
    if not frame.startswith(_FRAME_HEAD):
        return None
    end = frame.find('"', len(_FRAME_HEAD))
    if not frame.startswith(_OFFSET_FIELD, end):
        return None
    start = end + len(_OFFSET_FIELD)
    return frame[len(_FRAME_HEAD) : end], offset_key(frame[start : frame.index('"', start)])


# Publishes one script run takes at most: a run holds Redis for its whole length.
_GATHER_MAX = 256


class _Gathered:
    """Publishes to one channel that go in one `_PUBLISH_MANY` run (`Broker._gather`)."""

    __slots__ = ("args", "keys", "retried", "waiting")

    def __init__(self, keys: list[str], args: list[Any]) -> None:
        self.keys = keys
        self.args = args
        self.retried = False  # once after a NOSCRIPT
        self.waiting: list[tuple[str, int, asyncio.Future[Published]]] = []  # id, ts, caller


class Broker:
    def __init__(
        self,
        redis: Redis,
        *,
        source: str,
        archive: bool = True,
        batch: AutoPipeline | None = None,
        count: bool = False,
    ) -> None:
        self.redis = redis
        self.source = source
        self.archive = archive  # queue events for the archiver; trimming waits for it
        self.count = count  # count events per channel for monitoring (`take_counts`)
        self.batch = batch or AutoPipeline(redis)
        self._publish = redis.register_script(_PUBLISH)
        self._publish_many = redis.register_script(_PUBLISH_MANY)
        self._epoch = redis.register_script(_EPOCH)
        self._read = redis.register_script(_READ)
        self._archived = redis.register_script(_ARCHIVED)
        self._take_counts = redis.register_script(_TAKE_COUNTS)
        # Publishes waiting for the next batch, by channel (`_gather`).
        self._gathering: dict[str, _Gathered] = {}
        self._gathered_full: list[_Gathered] = []  # of `_GATHER_MAX`, in the order filled

    async def publish(
        self,
        channel: ChannelRef,
        event_type: str,
        data: Any,
        *,
        meta: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        strict: bool = False,
    ) -> Published:
        """Append and announce an event.

        With ``idempotency_key``, the same key on the same channel within
        `IDEMPOTENCY_TTL_S` returns the first result (``duplicate``) and stores nothing:
        the check and the append are one script, so concurrent retries on any node agree.
        With ``strict`` (what clients publish), data the archive cannot store is refused
        (`UnstorableData`) instead of mended there.
        """
        ts = int(time.time() * 1000)
        event_id = new_event_id()
        payload = self._payload(event_id, event_type, ts, data, meta)
        # JSON's escape of U+0000 is in the payload only if some string may hold it.
        if strict and b"\\u0000" in payload and _has_nul(data):
            raise UnstorableData("U+0000 cannot be stored in a string (the archive's jsonb)")
        if idempotency_key is None:
            return await self._gather(channel, event_type, event_id, ts, payload)
        keys, args = self._publish_input(
            channel, event_type, event_id, ts, payload, idempotency_key
        )
        reply: bytes = await self.batch.script(self._publish, keys, args)
        offset, epoch, *first = reply.decode().split(" ")
        if first:  # the first publish's event id: this one is a duplicate
            return Published(offset, epoch, first[0], ts, True)
        return Published(offset, epoch, event_id, ts, False)

    def _gather(
        self, channel: ChannelRef, event_type: str, event_id: str, ts: int, payload: bytes
    ) -> asyncio.Future[Published]:
        """The publish joins the others to its channel that wait for the node's next Redis
        batch: one `_PUBLISH_MANY` run appends and announces them in the order they came.

        Under load, most of a publish's cost in Redis was the script run around the append
        (reading and writing the channel's metadata, counting, trimming), once per event;
        this pays it once per batch. An idle node sends each publish in the next batch, as
        before, so nothing waits longer than it did."""
        group = self._gathering.get(channel.stream_key)
        if group is None or len(group.waiting) >= _GATHER_MAX:
            if not self._gathering:
                self.batch.before_next_batch(self._send_gathered)
            if group is not None:  # full: it goes first, this one after it
                self._gathered_full.append(group)
            archive, counter = self._queues(channel)
            group = self._gathering[channel.stream_key] = _Gathered(
                [channel.meta_key, channel.stream_key, archive, counter],
                [*self._stream_args(channel, ts), channel.tenant, channel.name],
            )
        group.args += (payload, event_type)
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        group.waiting.append((event_id, ts, future))
        return future

    def _send_gathered(self) -> None:
        full, self._gathered_full = self._gathered_full, []
        gathering, self._gathering = self._gathering, {}
        for group in (*full, *gathering.values()):
            run = self.batch.evalsha(self._publish_many, group.keys, group.args)
            run.add_done_callback(functools.partial(self._settle, group))

    def _settle(self, group: _Gathered, run: asyncio.Future[Any]) -> None:
        """Each waiting publish gets its offset, or the run's failure."""
        failure = None if run.cancelled() else run.exception()
        if isinstance(failure, NoScriptError) and not group.retried:
            # A restarted Redis forgot it: once more, loaded first, in the pipeline's order.
            group.retried = True
            self.batch.forget(self._publish_many)
            again = self.batch.evalsha(self._publish_many, group.keys, group.args)
            again.add_done_callback(functools.partial(self._settle, group))
            return
        offsets: list[str] = []
        if failure is None and not run.cancelled():
            epoch, *offsets = run.result().decode().split(" ")
        for index, (event_id, ts, future) in enumerate(group.waiting):
            if future.done():  # the caller went away
                continue
            if run.cancelled():
                future.cancel()
            elif failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(Published(offsets[index], epoch, event_id, ts, False))

    def publish_nowait(self, channel: ChannelRef, event_type: str, data: Any) -> None:
        """Publish without waiting for the outcome (book-keeping events, such as `monitor`'s:
        a failure is logged, not raised)."""
        ts = int(time.time() * 1000)
        event_id = new_event_id()
        payload = self._payload(event_id, event_type, ts, data, None)
        keys, args = self._publish_input(channel, event_type, event_id, ts, payload, None)
        self.batch.send_script(self._publish, keys, args)

    def publish_many_nowait(self, channel: ChannelRef, events: Sequence[tuple[str, Any]]) -> None:
        """Publish (type, data) events in order in one script run, without waiting for the
        outcome: the events and announcements are those `publish_nowait` would make, for one
        trimming pass and one command (a connect storm's `monitor` events)."""
        if len(events) <= 1:
            for event_type, data in events:
                self.publish_nowait(channel, event_type, data)
            return
        ts = int(time.time() * 1000)
        archive, counter = self._queues(channel)
        keys = [channel.meta_key, channel.stream_key, archive, counter]
        args: list[Any] = [*self._stream_args(channel, ts), channel.tenant, channel.name]
        for event_type, data in events:
            args += (self._payload(new_event_id(), event_type, ts, data, None), event_type)
        self.batch.send_script(self._publish_many, keys, args)

    def _publish_input(
        self,
        channel: ChannelRef,
        event_type: str,
        event_id: str,
        ts: int,
        payload: bytes,
        idempotency_key: str | None,
    ) -> tuple[list[str], list[Any]]:
        idem = channel.idempotency_key(idempotency_key) if idempotency_key else ""
        archive, counter = self._queues(channel)
        keys = [channel.meta_key, channel.stream_key, idem, archive, counter]
        epoch, max_len, min_id, pubsub, ttl_ms = self._stream_args(channel, ts)
        args = [
            epoch,
            max_len,
            min_id,
            payload,
            pubsub,
            ttl_ms,
            event_type,
            event_id,
            IDEMPOTENCY_TTL_S * 1000,
            channel.tenant,
            channel.name,
        ]
        return keys, args

    def _payload(
        self, event_id: str, event_type: str, ts: int, data: Any, meta: dict[str, Any] | None
    ) -> bytes:
        return event_payload(
            event_id, event_type, ts, data, {"source": self.source, "version": "1", **(meta or {})}
        )

    def _queues(self, channel: ChannelRef) -> tuple[str, str]:
        """The archive queue and the published-events counter the script feeds ("": none)."""
        archive = channel.archive_key if self.archive and channel.archived else ""
        return archive, channel.counter_key if self.count else ""

    @staticmethod
    def _stream_args(channel: ChannelRef, ts: int) -> tuple[str, int, str, str, int]:
        """Epoch candidate, max_len, min_id (older events may be trimmed), pubsub channel and
        the keys' ttl: the arguments both publish scripts open and trim the stream with."""
        namespace = channel.namespace
        return (
            new_epoch(),
            namespace.max_len,
            f"{ts - namespace.max_age_s * 1000}-0",
            channel.pubsub_channel,
            namespace.max_age_s * 1000 + _EXTRA_TTL_MS,
        )

    async def take_counts(self) -> dict[tuple[str, str], int]:
        """Events published since the last call, per (tenant, channel), over every node's
        publishes: each partition's counter is read and emptied in one step, so concurrent
        takers never count an event twice."""
        taken = await asyncio.gather(
            *(
                self.batch.script(self._take_counts, keys=[counter_key(p)], args=[])
                for p in range(PARTITIONS)
            )
        )
        counts: dict[tuple[str, str], int] = {}
        for flat in taken:
            for field, n in zip(flat[::2], flat[1::2], strict=True):
                tenant, _, channel = field.decode().partition(" ")
                counts[(tenant, channel)] = counts.get((tenant, channel), 0) + int(n)
        return counts

    async def epoch(self, channel: ChannelRef) -> str:
        ttl_ms = channel.namespace.max_age_s * 1000 + _EXTRA_TTL_MS
        epoch, _, _ = await self.batch.script(
            self._epoch, keys=[channel.meta_key, channel.stream_key], args=[new_epoch(), ttl_ms]
        )
        return str(epoch.decode())

    async def mark_archived(self, positions: Sequence[tuple[str, str, str]]) -> None:
        """Record, per (meta key, epoch, offset), that the archive holds the channel up to
        ``offset``: from then on the publish script may trim that far.

        The marks share the node's round trips by SHA: a pipeline with a `Script` would ask
        ``SCRIPT EXISTS`` first, one more round trip per archive batch. Every mark is sent
        even if one fails; the first failure is raised then.
        """
        results = await asyncio.gather(
            *(
                self.batch.script(self._archived, keys=[meta_key], args=[epoch, offset])
                for meta_key, epoch, offset in positions
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result

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

        Metadata and range come from one script, so they describe the same moment.
        """
        ttl_ms = channel.namespace.max_age_s * 1000 + _EXTRA_TTL_MS
        if after is not None:
            range_, bound, count = ("after-reverse" if reverse else "after"), after, limit
        elif last:
            range_, bound, count = "last", "", last
        else:
            range_, bound, count = "", "", None
        epoch, trimmed_raw, archived_raw, newest, entries = await self.batch.script(
            self._read,
            keys=[channel.meta_key, channel.stream_key],
            args=[new_epoch(), ttl_ms, range_, bound, count or 0],
        )
        if range_ == "last" and not reverse:
            entries.reverse()  # oldest first
        events = [StoredEvent(entry_id.decode(), _payload(fields)) for entry_id, fields in entries]
        return Snapshot(
            epoch=epoch.decode(),
            last_offset=newest.decode() if newest else "0-0",
            trimmed=trimmed_raw.decode() if trimmed_raw else None,
            events=events,
            archived=archived_raw.decode() if archived_raw else None,
        )

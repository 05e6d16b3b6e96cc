"""The hub: this node's channel → local subscribers map, fed by one Redis subscription per
channel however many local subscribers it has.

Each announced event is turned into its frame once per node; the same string object is
queued for every local subscriber (no per-subscriber encoding, no task per delivery).
A subscriber that is still replaying history buffers live events, which are merged by
offset when the replay ends: no gap, no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apix.core.json import loads
from apix.core.logging import get_logger
from apix.core.tasks import stop_task
from apix.infra.redis import WatchedPubSub
from apix.realtime.broker import event_frame, offset_key
from apix.realtime.channels import ChannelRef
from apix.realtime.connection import hold_writes, release_writes
from apix.realtime.transport import text_frame

log = get_logger(__name__)

# Messages fanned out together at most (see `Hub._read`).
_BATCH = 64


class Outbox(Protocol):
    """Where a subscriber's frames go: a connection's bounded send queue."""

    closed: bool

    def push(self, frame: str, *, wire: bytes | None = None, priority: int = 1) -> None: ...


@dataclass(eq=False, slots=True)
class Subscription:
    connection_id: str
    channel: ChannelRef
    outbox: Outbox
    types: re.Pattern[str] | None = None
    presence: bool = False
    # While replaying: live (offset, type, frame) held back until the replay is sent.
    buffer: list[tuple[str, str, str]] | None = field(default_factory=list)
    last_offset: str = "0-0"
    last_key: tuple[int, int] = (0, 0)  # last_offset, parsed: compared on every event
    epoch: str = ""
    # SSE needs its own framing; WebSocket subscribers take the frame as is.
    encode: Callable[[str, str, str, str], str] | None = None
    # `ack: true` subscriptions: told of every event sent, for redelivery bookkeeping.
    ack: bool = False
    acked: str = "0-0"
    pending: dict[str, str] = field(default_factory=dict)  # offset → redelivery entry
    on_deliver: Callable[[Subscription, str], None] | None = None

    def wants(self, event_type: str) -> bool:
        return self.types is None or self.types.match(event_type) is not None

    def advance(self, offset: str, key: tuple[int, int] | None = None) -> None:
        self.last_offset = offset
        self.last_key = key if key is not None else offset_key(offset)


def compile_filter(patterns: list[str] | None) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


@dataclass
class HubStats:
    events_in: int = 0
    frames_out: int = 0
    fanout_seconds: float = 0.0
    interruptions: int = 0
    batches: int = 0  # reads that brought several messages, fanned out together
    writes_saved: int = 0  # frames that went out joined, less one per write (`hold_writes`)


class Hub:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._pubsub = WatchedPubSub(redis.connection_pool)
        self._pubsub.on_reconnect = self._interrupted
        self._subs: dict[str, set[Subscription]] = defaultdict(set)  # pubsub channel → subs
        self._locks: dict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._reader: asyncio.Task[None] | None = None
        self._confirmations: dict[str, asyncio.Future[None]] = {}
        self._stopping = False
        self._polling = False  # waiting in `get_message`: safe to interrupt at stop
        self._control: dict[str, Callable[[dict[str, Any]], None]] = {}
        self.stats = HubStats()
        # Called when the pub/sub connection broke (announcements may have been missed).
        self.on_interrupted: Callable[[], None] | None = None

    async def start(self) -> None:
        # A placeholder subscription keeps the pub/sub connection open from the start.
        await self._pubsub.subscribe("apix:hub:keepalive")
        self._reader = asyncio.create_task(self._read(), name="apix-hub-reader")

    async def stop(self) -> None:
        # The reader checks this between reads; one waiting for news is interrupted at
        # once. Cancelling it mid-command is the fallback, since redis-py may swallow that
        # cancellation.
        self._stopping = True
        reader, self._reader = self._reader, None
        if reader is not None:
            await stop_task(reader, grace_s=2.0, interrupt=self._polling)
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]  # typed since redis 8.2

    def on_control(self, key: str, handler: Callable[[dict[str, Any]], None]) -> None:
        """Call ``handler`` with each JSON message published on ``key`` (node control)."""
        self._control[key] = handler

    async def listen(self, key: str) -> None:
        confirmed = asyncio.get_running_loop().create_future()
        self._confirmations[key] = confirmed
        await self._pubsub.subscribe(key)
        await asyncio.wait_for(confirmed, timeout=10)

    async def add(self, sub: Subscription) -> None:
        """Register ``sub`` (buffering) and make sure this node hears its channel.

        Returns once Redis has confirmed the subscription, so a stream read that follows
        cannot miss an event announced in between.
        """
        key = sub.channel.pubsub_channel
        async with self._locks[key]:
            subs = self._subs[key]
            first = not subs
            subs.add(sub)
            if first:
                confirmed = asyncio.get_running_loop().create_future()
                self._confirmations[key] = confirmed
                try:
                    await self._pubsub.subscribe(key)
                    # Redis confirms before it sends any message of that channel: from
                    # here on, every announcement reaches this node.
                    await asyncio.wait_for(confirmed, timeout=10)
                except BaseException:
                    self._confirmations.pop(key, None)
                    subs.discard(sub)
                    raise

    async def remove(self, sub: Subscription) -> None:
        key = sub.channel.pubsub_channel
        async with self._locks[key]:
            subs = self._subs.get(key)
            if subs is None:
                return
            subs.discard(sub)
            if not subs:
                del self._subs[key]
                await self._pubsub.unsubscribe(key)

    def go_live(self, sub: Subscription, *, after: str) -> int:
        """End ``sub``'s replay: send buffered live events newer than ``after``."""
        sent = 0
        buffered, sub.buffer = sub.buffer or [], None
        floor = offset_key(after)
        for offset, event_type, frame in buffered:
            if offset == "-" or offset_key(offset) > floor:
                if sub.wants(event_type):
                    sub.outbox.push(frame)
                    sent += 1
                    if sub.on_deliver is not None and offset != "-":
                        sub.on_deliver(sub, offset)
                if offset != "-":
                    sub.advance(offset)
        return sent

    def _interrupted(self) -> None:
        """Live announcements may have been missed: whoever listens must catch up."""
        self.stats.interruptions += 1
        if self.on_interrupted is not None:
            self.on_interrupted()

    def channel_count(self) -> int:
        return len(self._subs)

    async def _read(self) -> None:
        while not self._stopping:
            try:
                self._polling = True
                try:
                    message = await self._pubsub.get_message(timeout=0.2)
                finally:
                    self._polling = False
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("hub: pub/sub read failed; retrying", error=repr(exc))
                if isinstance(exc, RedisConnectionError | RedisTimeoutError):
                    self._interrupted()
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            messages = await self._more(message)
            started = asyncio.get_running_loop().time()
            if len(messages) > 1:
                # Events that arrived together leave together: one write a socket.
                hold_writes()
                try:
                    for message in messages:
                        self._handle(message)
                finally:
                    self.stats.writes_saved += release_writes()
                self.stats.batches += 1
            else:
                self._handle(message)
            self.stats.fanout_seconds += asyncio.get_running_loop().time() - started

    async def _more(self, first: dict[str, Any]) -> list[dict[str, Any]]:
        """``first`` and the messages read with it (already parsed, or in the socket's
        buffer): never waits for the network."""
        messages = [first]
        connection: Any = self._pubsub.connection  # typed as always None by redis-py
        # A failure here is met again by the next read, which handles it.
        with contextlib.suppress(Exception):
            while len(messages) < _BATCH and connection is not None and await connection.can_read():
                message = await self._pubsub.get_message(timeout=0)
                if message is None:  # only part of one is in: it comes with the next read
                    break
                messages.append(message)
        return messages

    def _handle(self, message: dict[str, Any]) -> None:
        if message["type"] == "subscribe":
            confirmed = self._confirmations.pop(message["channel"].decode(), None)
            if confirmed is not None and not confirmed.done():
                confirmed.set_result(None)
            return
        if message["type"] != "message":
            return
        key = message["channel"].decode()
        try:
            handler = self._control.get(key)
            if handler is not None:
                handler(loads(message["data"]))
            else:
                self._dispatch(key, message["data"])
        except Exception:
            log.exception("hub: could not dispatch an event")

    def _dispatch(self, key: str, raw: bytes) -> None:
        subs = self._subs.get(key)
        if not subs:
            return
        kind, epoch, offset, event_type, payload = raw.split(b" ", 4)
        offset_s, epoch_s, type_s = offset.decode(), epoch.decode(), event_type.decode()
        channel_name = next(iter(subs)).channel.name
        if kind == b"e":
            frame = event_frame(channel_name, offset_s, epoch_s, payload)
        else:  # presence: not stored, no offset; only for presence subscribers
            frame = (
                f'{{"op":"event","channel":"{channel_name}","offset":null,"epoch":"{epoch_s}",'
                f'{payload[1:-1].decode()},"attempt":1}}'
            )
            offset_s = "-"
        self.stats.events_in += 1
        okey = offset_key(offset_s) if kind == b"e" else (0, 0)
        wire: bytes | None = None  # the WebSocket frame, built once for every subscriber
        out = 0
        for sub in subs:
            if (kind != b"e" and not sub.presence) or sub.outbox.closed:
                # A closed connection's positions must stay where its last frame was sent.
                continue
            text = frame if sub.encode is None else sub.encode(frame, offset_s, epoch_s, type_s)
            if sub.buffer is not None:
                sub.buffer.append((offset_s, type_s, text))
                continue
            if kind == b"e":
                if okey <= sub.last_key and epoch_s == sub.epoch:
                    # Already sent by the replay (its announcement arrived late).
                    continue
                sub.last_offset = offset_s  # `advance`, inlined: this runs per delivery
                sub.last_key = okey
                sub.epoch = epoch_s
            types = sub.types
            if types is None or types.match(type_s) is not None:
                if sub.encode is None:
                    if wire is None:
                        wire = text_frame(frame.encode())
                    sub.outbox.push(text, wire=wire)
                else:
                    sub.outbox.push(text)
                out += 1
                if sub.on_deliver is not None and kind == b"e":
                    sub.on_deliver(sub, offset_s)
        self.stats.frames_out += out

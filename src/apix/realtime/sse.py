"""Server-Sent Events: the receive-only transport (PROTOCOL.md section 8).

Each event is sent as `id: <channel>|<epoch>|<offset>`, `event: <type>` and `data: <the
event object>`. `Last-Event-ID` (or `since=<channel>|<epoch>|<offset>` per channel) resumes
exactly as `since` does on the WebSocket. A comment line is sent as a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator

from apix.core.errors import BadRequest
from apix.identity.principal import Principal
from apix.realtime import channels as channel_registry
from apix.realtime.broker import event_frame
from apix.realtime.gateway import Gateway
from apix.realtime.hub import Subscription
from apix.realtime.schemas import Position


def sse_event(frame: str, offset: str, epoch: str, event_type: str, channel: str) -> str:
    return f"id: {channel}|{epoch}|{offset}\nevent: {event_type}\ndata: {frame}\n\n"


def parse_position(value: str) -> tuple[str, Position]:
    """`<channel>|<epoch>|<offset>` → (channel, position)."""
    parts = value.split("|")
    if len(parts) != 3:
        raise BadRequest("a position is <channel>|<epoch>|<offset>")
    channel, epoch, offset = parts
    try:
        return channel, Position(offset=offset, epoch=epoch or None)
    except ValueError as exc:
        raise BadRequest(f"invalid position {value!r}") from exc


class SseOutbox:
    """A subscriber's queue for one SSE response, bounded like the WebSocket one; the
    gateway ends it (`end`) when the credential it was opened with is revoked."""

    def __init__(self, limit: int, principal: Principal) -> None:
        self.principal = principal
        self.ended = False
        self.frames: deque[str] = deque()
        self.size = 0
        self.limit = limit
        self.wakeup = asyncio.Event()
        self.overflowed = False
        self.closed = False

    def push(self, frame: str, *, wire: bytes | None = None, priority: int = 1) -> None:
        if self.overflowed:
            return
        self.frames.append(frame)
        self.size += len(frame)
        if self.size > self.limit:
            self.overflowed = True
        self.wakeup.set()

    def end(self) -> None:
        self.ended = True
        self.wakeup.set()


async def open_stream(
    gateway: Gateway,
    principal: Principal,
    names: list[str],
    positions: dict[str, Position],
    *,
    mark: int | None = None,
) -> AsyncIterator[str]:
    """Subscribe to ``names`` and yield SSE text until the client goes or falls behind.

    With ``mark`` (the gateway's `revocation_mark`, read before authenticating) the stream
    also ends when ``principal``'s credential is revoked (the APIX SSE endpoint, an agent
    run's events). Without, it is one request's stream (a chat completion's) and finishes
    as any request in flight.
    """
    if not names:
        raise BadRequest("give at least one channel: ?channel=<name>")
    if len(names) > gateway.config.max_subscriptions:
        raise BadRequest("too many channels")
    refs = []
    for name in dict.fromkeys(names):
        channel = channel_registry.parse(name, principal)
        channel_registry.check_subscribe(principal, channel)
        refs.append(channel)
    outbox = SseOutbox(gateway.config.send_buffer_bytes, principal)
    subs: list[Subscription] = []
    try:
        for channel in refs:

            def encode(
                frame: str, offset: str, epoch: str, kind: str, name: str = channel.name
            ) -> str:
                return sse_event(frame, offset, epoch, kind, name)

            sub = Subscription(
                connection_id=f"sse:{id(outbox)}", channel=channel, outbox=outbox, encode=encode
            )
            subs.append(sub)
            since = positions.get(channel.name)
            snapshot, _recovered, replay = await gateway.attach(sub, since=since, last=0)
            for event in replay:
                frame = event_frame(channel.name, event.offset, snapshot.epoch, event.payload)
                outbox.push(
                    sse_event(frame, event.offset, snapshot.epoch, event.type, channel.name)
                )
            gateway.hub.go_live(sub, after=sub.last_offset)
    except BaseException:
        for sub in subs:
            await gateway.hub.remove(sub)
        raise
    return _pump(gateway, outbox, subs, mark)


async def _pump(
    gateway: Gateway, outbox: SseOutbox, subs: list[Subscription], mark: int | None
) -> AsyncIterator[str]:
    heartbeat = gateway.config.sse_heartbeat_s
    # After a Redis interruption the stream ends (within a heartbeat): the client comes
    # back with Last-Event-ID and the replay fills the gap or says it cannot.
    interruptions = gateway.hub.stats.interruptions
    if mark is not None:
        gateway.streams.add(outbox)  # where revocations find it; any since `mark`, now:
        if gateway.revoked_since(mark, outbox.principal):
            outbox.end()
    try:
        yield ": connected\n\n"
        while (
            not outbox.overflowed
            and not gateway.closing
            and gateway.hub.stats.interruptions == interruptions
        ):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(outbox.wakeup.wait(), timeout=heartbeat)
            outbox.wakeup.clear()
            if outbox.ended:  # `end` sets the wakeup too
                # Its credential was revoked: nothing more is sent. The browser comes back
                # with the same credential, is refused (401), and stops.
                return
            if gateway.hub.stats.interruptions != interruptions:
                # What is buffered came after a gap: sending it would move the client's
                # Last-Event-ID past events it never got. End here; it resumes before them.
                return
            if not outbox.frames:
                yield ": heartbeat\n\n"
                continue
            chunk = "".join(outbox.frames)
            outbox.frames.clear()
            outbox.size = 0
            yield chunk
    finally:
        gateway.streams.discard(outbox)
        for sub in subs:
            with contextlib.suppress(Exception):
                await gateway.hub.remove(sub)

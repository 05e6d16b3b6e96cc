"""A client connection's send side: a bounded queue, drained by a writer task while it holds
anything.

The hub only appends to the queue (no await, no task per frame); the writer sends frames in
order, and exists only while there is a backlog: most frames go straight to the socket (the
fast path), so an idle connection carries no task, no coroutine and no event. A client that
does not read fast enough lets its queue grow past the limit and is closed with 4011 (slow
consumer) so it never slows anyone else down. Before that, under pressure, low-priority
frames with a coalescing key give way to newer ones (quality of service,
docs/monitoring.md); high-priority frames are never coalesced.
"""

from __future__ import annotations

import asyncio
import fnmatch
import re
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from apix.core.logging import get_logger
from apix.realtime.channels import NAMESPACES, Priority
from apix.realtime.transport import text_frame

if TYPE_CHECKING:
    from apix.monitoring.probe import DeliveryProbe, Label

log = get_logger(__name__)

SendText = Callable[[str], Awaitable[None]]
# Called once with the frames dropped from the queue (never sent) when it overflows.
OnOverflow = Callable[[list[str]], None]


class Socket(Protocol):
    """A client's WebSocket, as the gateway uses it (`apix.realtime.transport`)."""

    def cap_write_buffer(self, limit: int) -> None: ...

    def write_frame(self, frame: bytes) -> int:
        """Write a built frame at once if nothing holds it back; -1 if not written,
        else the bytes still buffered when the write made the socket pause (or 0)."""

    def writable(self) -> bool:
        """Whether `write_frame` would write now (open, and not applying backpressure)."""

    async def send_text(self, text: str) -> None:
        """Send a message, waiting for the client to read (OSError once closed)."""

    def close(self, code: int, reason: str) -> None:
        """Send the close frame; the socket goes once the client answers or in a while."""

    def abort(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


# Quality of service. Past this share of the send buffer a connection is under pressure:
# a new low-priority frame with a coalescing key replaces the queued one with the same key.
PRESSURE_RATIO = 0.25
# Event types of low-priority namespaces that carry state, not history (the newest wins).
COALESCE_TYPES = ("cursor.*", "*.cursor", "typing.*", "*.typing", "*.state")
_COALESCE = re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in COALESCE_TYPES))
_CHANNEL_AT = len('{"op":"event","channel":"')


class _Hold:
    __slots__ = ("queues",)

    def __init__(self) -> None:
        self.queues: list[SendQueue] | None = None  # holding, and the queues that hold frames


_hold = _Hold()


def hold_writes() -> None:
    """Until `release_writes`, frames that would go straight to a socket wait in their
    queue, so that a client that gets several of them gets them in one write.

    The hub holds writes while it fans out events that arrived together: under load, a
    system call per socket for each event was most of a delivery's cost. Only synchronous
    code may run in between (nothing else may write to these sockets meanwhile)."""
    _hold.queues = []


def release_writes() -> int:
    """Write what each queue held, one write a socket; returns the writes this saved."""
    queues, _hold.queues = _hold.queues, None
    saved = 0
    for queue in queues or ():
        try:
            saved += queue._release()
        except Exception:  # one socket's failure is not everyone's
            log.exception("fan-out: a held write failed")
    return saved


# A queue holds this many bytes at most: past it they go out at once (one write of 16 KiB
# costs about what one of a few hundred bytes does), so a batch never writes more to a
# socket at once than a frame or two would have.
_HOLD_BYTES = 16 * 1024


class _Live:
    """A queued live event frame; ``frame`` is None once a newer one replaced it."""

    __slots__ = ("frame", "key")

    def __init__(self, frame: str) -> None:
        self.frame: str | None = frame
        self.key: tuple[str, ...] | None = None


def coalescing_key(frame: str) -> tuple[tuple[str, ...] | None, str]:
    """(the key a frame may be coalesced under, its namespace).

    Keyed: presence events on any namespace below HIGH (per channel and member), and
    events of LOW namespaces whose type is in `COALESCE_TYPES` (per channel, type and
    publisher). High-priority namespaces (`user`, `hitl`) never have a key.
    """
    channel = frame[_CHANNEL_AT : frame.index('"', _CHANNEL_AT)]
    name = channel.partition(":")[0]
    namespace = NAMESPACES.get(name)
    priority = namespace.priority if namespace is not None else Priority.NORMAL
    if priority is Priority.HIGH:
        return None, name
    presence = '"offset":null' in frame
    if not presence and priority is not Priority.LOW:
        return None, name
    event: dict[str, Any] = orjson.loads(frame)
    event_type = str(event.get("type", ""))
    if presence:
        data = event.get("data") or {}
        return (channel, "presence", str(data.get("connection_id"))), name
    if _COALESCE.match(event_type):
        actor = (event.get("meta") or {}).get("actor")
        return (channel, event_type, str(actor)), name
    return None, name


class SendQueue:
    """Frames waiting for one client, bounded in bytes (approximated by string length)."""

    __slots__ = (
        "_drained",
        "_frames",
        "_held",
        "_held_bytes",
        "_in_flight",
        "_keyed",
        "_limit",
        "_on_overflow",
        "_pressure",
        "_send",
        "_writer",
        "closed",
        "coalesced",
        "direct",
        "label",
        "probe",
        "size",
    )

    def __init__(
        self, limit_bytes: int, on_overflow: OnOverflow, direct: Socket | None = None
    ) -> None:
        # Created when a frame must wait (an empty deque is 600 bytes, most never need one).
        self._frames: deque[str | _Live] | None = None
        self._keyed: dict[tuple[str, ...], _Live] = {}
        self._in_flight: str | None = None
        self._held: list[bytes] | None = None  # frames held for one write (`hold_writes`)
        self._held_bytes = 0
        self._limit = limit_bytes
        self._pressure = int(limit_bytes * PRESSURE_RATIO)
        self.coalesced = 0
        # Set once the connection is established: latency and delivery counts (monitoring).
        self.probe: DeliveryProbe | None = None
        self.label: Label | None = None
        self._on_overflow = on_overflow
        self.size = 0
        self.closed = False
        self._send: SendText | None = None  # set by `start`
        self._writer: asyncio.Task[None] | None = None  # while frames are queued
        self._drained: list[asyncio.Future[None]] | None = None  # `wait_empty` callers
        # The fast path: write pre-built frames straight to the socket while nothing is
        # queued or in flight (order is kept: anything queued goes first, by the writer).
        self.direct = direct
        if direct is not None:
            direct.cap_write_buffer(limit_bytes)

    def start(self, send: SendText) -> None:
        """Frames go out through ``send`` from now on (those queued before, first)."""
        self._send = send
        if self._frames:
            self._wake()

    @property
    def busy(self) -> bool:
        """Whether frames are queued or being sent."""
        return self._writer is not None or bool(self._frames)

    async def wait_empty(self) -> None:
        """Return once everything queued so far has been sent (or the queue closed)."""
        if not self.busy or self.closed:
            return
        drained = asyncio.get_running_loop().create_future()
        if self._drained is None:
            self._drained = []
        self._drained.append(drained)
        await drained

    def push(self, frame: str, *, wire: bytes | None = None, priority: int = 1) -> None:
        if self.closed:
            return
        direct = self.direct
        if wire is not None and direct is not None and self._writer is None and not self._frames:
            holding = _hold.queues
            if holding is not None and direct.writable():
                held = self._held
                if held is None:
                    self._held = held = [wire]
                    self._held_bytes = len(wire)
                    holding.append(self)
                else:
                    held.append(wire)
                    self._held_bytes += len(wire)
                buffered = 0 if self._held_bytes < _HOLD_BYTES else self._write_held(held)
            else:
                buffered = direct.write_frame(wire)
            if buffered >= 0:
                probe = self.probe
                if probe is not None:
                    probe.written(frame, self.label)  # type: ignore[arg-type]
                if buffered > self._limit:
                    self.closed = True
                    self._on_overflow([])
                return
        entry = _Live(frame)
        if self.size >= self._pressure:
            self._coalesce(entry, frame)
        if self._frames is None:
            self._frames = deque()
        self._frames.append(entry)
        self.size += len(frame)
        if self.size > self._limit:
            self.closed = True
            # The frame being sent is waiting for the socket: it never left either.
            dropped: list[str | None] = [self._in_flight]
            dropped += [f if isinstance(f, str) else f.frame for f in self._frames]
            self._frames = None
            self._keyed.clear()
            self._on_overflow([f for f in dropped if f is not None])
            return
        if self._writer is None:
            self._wake()

    def _release(self) -> int:
        """Write the frames held since `hold_writes`, joined; returns the writes that saved."""
        held = self._held
        if not held or self.closed:
            self._held = None
            return 0
        buffered = self._write_held(held)
        if buffered > self._limit:
            self.closed = True
            self._on_overflow([])
        return len(held) - 1 if buffered >= 0 else 0

    def _write_held(self, held: list[bytes]) -> int:
        """Write ``held`` in one go, as `write_frame` writes one frame (its answer)."""
        self._held = None
        direct = self.direct
        if direct is None:
            return -1
        # The socket was writable when they were held, and only its own writes (held until
        # now) can make it pause: -1 here means it closed meanwhile, taking them with it.
        return direct.write_frame(held[0] if len(held) == 1 else b"".join(held))

    def _coalesce(self, entry: _Live, frame: str) -> None:
        key, namespace = coalescing_key(frame)
        if key is None:
            return
        entry.key = key
        older = self._keyed.get(key)
        self._keyed[key] = entry
        if older is not None and older.frame is not None:
            self.size -= len(older.frame)
            older.frame = None
            self.coalesced += 1
            if self.probe is not None and self.label is not None:
                self.probe.coalesced(self.label, namespace)

    def push_unbounded(self, frame: str, *, framed: bytes | None = None) -> None:
        """For replies and replays the client asked for: counted, never an overflow.
        ``framed``: the WebSocket frame of ``frame``, when it was built already."""
        if self.closed:
            return
        probe = self.probe
        if (
            probe is not None
            and frame.startswith('{"op":"event"')
            and not frame.endswith(',"attempt":1}')
        ):
            probe.redelivered(frame, self.label)  # type: ignore[arg-type]
        if self._held:  # held event frames go first (a hub handler may answer mid-batch)
            self._release()
        direct = self.direct
        if (
            direct is not None
            and self._send is not None
            and self._writer is None
            and not self._frames
            and direct.write_frame(framed or text_frame(frame.encode())) >= 0
        ):
            return  # sent at once: no writer task for a reply or a ping
        if self._frames is None:
            self._frames = deque()
        self._frames.append(frame)
        self.size += len(frame)
        if self._writer is None:
            self._wake()

    def _wake(self) -> None:
        if self._send is not None and not self.closed:
            self._writer = asyncio.get_running_loop().create_task(self._drain(self._send))

    async def _drain(self, send: SendText) -> None:
        """Send frames in order until none is left; the writer task runs this."""
        frames = self._frames or deque()
        try:
            while frames and not self.closed:
                item = frames.popleft()
                if isinstance(item, str):
                    frame, live = item, False
                else:
                    if item.key is not None and self._keyed.get(item.key) is item:
                        del self._keyed[item.key]
                    if item.frame is None:
                        continue  # coalesced: a newer frame with its key is queued
                    frame, live = item.frame, True
                self.size -= len(frame)
                self._in_flight = frame
                try:
                    await send(frame)
                finally:
                    self._in_flight = None
                if live and self.probe is not None:
                    self.probe.written(frame, self.label)  # type: ignore[arg-type]
        except (OSError, RuntimeError):  # the socket is gone: nothing more can be sent
            self.closed = True
            frames.clear()
        finally:
            self._writer = None
            if self._frames is frames and not frames:
                self._frames = None
            self._wake_waiters()

    def _wake_waiters(self) -> None:
        drained, self._drained = self._drained, None
        for waiter in drained or ():
            if not waiter.done():
                waiter.set_result(None)

    def close(self) -> None:
        """Drop what is queued and stop the writer. Frames held for a write (`hold_writes`)
        go first: they count as sent, as a frame written straight to the socket does."""
        if self._held:
            self._write_held(self._held)
        self.closed = True
        self._frames = None
        self._keyed.clear()
        if self._writer is not None:
            self._writer.cancel()
        self._wake_waiters()

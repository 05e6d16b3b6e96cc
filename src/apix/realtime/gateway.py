"""The APIX gateway: PROTOCOL.md over WebSocket, one `ClientConnection` per socket.

`Gateway` is per node (created in the lifespan): broker, hub, presence and registry, and the
connections this node holds. Sockets come from the node's own WebSocket protocol
(`apix.realtime.transport`), which calls a connection back as messages arrive; an idle
connection is data and one timer (token expiry; the node's heartbeat pings it), with no task
of its own. A task exists only while commands are running or frames wait for a slow client.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid
import weakref
from collections import Counter, deque
from collections.abc import Coroutine, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from aiolimiter import AsyncLimiter
from pydantic import TypeAdapter, ValidationError
from redis.asyncio import Redis
from starlette.types import Receive, Scope, Send

from apix.config import Settings
from apix.core.errors import (
    AppError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Unauthorized,
    error_content,
)
from apix.core.json import dumps
from apix.core.logging import get_logger
from apix.core.tasks import Periodic
from apix.identity import errors as identity_errors
from apix.identity import service as identity
from apix.identity.models import Organization
from apix.identity.principal import Principal
from apix.identity.runtime import IdentityRuntime
from apix.infra.redis import AutoPipeline
from apix.monitoring.probe import DeliveryProbe, Label
from apix.realtime import archive, service
from apix.realtime import channels as channel_registry
from apix.realtime.broker import (
    Broker,
    Snapshot,
    StoredEvent,
    event_frame,
    event_position,
    offset_key,
)
from apix.realtime.channels import ChannelRef
from apix.realtime.connection import SendQueue, Socket
from apix.realtime.delivery import Redelivery, Sessions, new_session_token, offset_before
from apix.realtime.delivery import snapshot as session_snapshot
from apix.realtime.heartbeat import Heartbeat
from apix.realtime.hub import Hub, Subscription, compile_filter
from apix.realtime.presence import Presence
from apix.realtime.registry import CONTROL_CHANNEL, ConnectionRecord, Registry
from apix.realtime.schemas import (
    COMMAND_OPS,
    AckCommand,
    Command,
    ConnectCommand,
    HistoryCommand,
    PingCommand,
    PongCommand,
    Position,
    PresenceCommand,
    PublishCommand,
    RefreshCommand,
    SubscribeCommand,
    UnsubscribeCommand,
)
from apix.realtime.transport import SUBPROTOCOL, AsgiSocket

log = get_logger(__name__)

_commands = TypeAdapter(Command)

# Close codes (PROTOCOL.md section 9).
PROTOCOL_ERROR = 4000
UNAUTHORIZED = 4001
TOKEN_EXPIRED = 4003
CONNECT_TIMEOUT = 4008
HEARTBEAT_TIMEOUT = 4009
KICKED = 4010
SLOW_CONSUMER = 4011
RATE_LIMITED = 4029
SHUTTING_DOWN = 4500
TOO_LARGE = 1009

# What each kind of revocation names, on a principal (`Gateway.revoked`).
_REVOKED_BY = {"session": "session_id", "organization": "org_id", "api_key": "api_key_id"}
_RECENT_REVOCATIONS = 1024

_SESSION_SAVE_S = 5.0
# Session positions are saved a slice of the connections at a time, so that no single
# loop turn builds and sends thousands of them (a stall every event waits out).
_SESSION_SLICES = 10
_RTT_SHOW_S = 60.0
_FLUSH_TIMEOUT_S = 1.0
_CLOSE_TIMEOUT_S = 5.0
# Commands waiting while one runs: past this many, the client's socket is not read.
_INBOX_PAUSE = 32
# `monitor` events published by one script run at most (bounds how long it holds Redis).
_MONITOR_BATCH = 100


class Stream(Protocol):
    """What streams to one authenticated client besides a connection: an SSE response."""

    principal: Principal

    def end(self) -> None:
        """Finish the stream soon (its credential was revoked)."""


class Gateway:
    def __init__(self, settings: Settings, identity_runtime: IdentityRuntime, redis: Redis) -> None:
        self.settings = settings
        self.config = settings.realtime
        self.identity = identity_runtime
        self.redis = redis
        self.node = settings.node_id
        # The node's Redis writes and scripts on the hot paths share round trips.
        self.batch = batch = AutoPipeline(redis)
        self.broker = Broker(
            redis,
            source=f"apix-node:{self.node}",
            archive=settings.worker.archive,
            batch=batch,
            count=settings.monitoring.counting,
        )
        self.hub = Hub(redis)
        self.presence = Presence(redis, ttl_s=self.config.presence_ttl_s, source=self.broker.source)
        self.registry = Registry(
            redis,
            identity_runtime.database,
            node=self.node,
            flush_s=self.config.registry_flush_s,
            batch=batch,
        )
        self.connections: dict[str, ClientConnection] = {}
        # Connections cleaning up after a close (shutdown waits for them).
        self.finishing: set[asyncio.Future[None]] = set()
        self.sessions = Sessions(redis, self.config, batch)
        self.redelivery = Redelivery(
            redis,
            identity_runtime.database,
            self.broker,
            self.config,
            node=self.node,
            connections=self.connections,
            on_failed=self._message_failed,
        )
        self._loops = [
            Periodic(
                "apix-presence", max(1.0, self.config.presence_ttl_s / 3), self._refresh_presence
            ),
            Periodic("apix-sessions", _SESSION_SAVE_S / _SESSION_SLICES, self._save_sessions),
        ]
        self._save_slice = 0
        # The established connections again, dealt round the save slices: a save run
        # looks at its slice only, not at every connection.
        self.slices: list[dict[str, ClientConnection]] = [{} for _ in range(_SESSION_SLICES)]
        # `monitor` events of this loop turn, per channel (`monitor_event`).
        self._monitor_events: dict[str, tuple[ChannelRef, list[tuple[str, Any]]]] = {}
        self._accepted = 0  # connections so far: deals them round the save slices
        # Established connections per (organisation, client type), and subscriptions per
        # organisation, kept as they come and go: what monitoring reports every few
        # seconds, without counting every connection each time.
        self.census: Counter[tuple[uuid.UUID, str]] = Counter()
        self.subscribed: Counter[uuid.UUID] = Counter()
        self.closing = False
        # Set by the monitoring runtime: latency samples and delivery counts.
        self.probe: DeliveryProbe | None = None
        # Open SSE streams, each told to end when its credential is revoked (`revoked`).
        self.streams: set[Stream] = set()
        # Revocations heard so far, and the latest of them (`revoked_since`).
        self.revocation_mark = 0
        self._recent_revocations: deque[tuple[int, str, frozenset[uuid.UUID]]] = deque(
            maxlen=_RECENT_REVOCATIONS
        )
        # Connections that owe a `connect`, with their deadlines (`expect_connect`).
        self._awaiting: deque[tuple[float, weakref.ref[ClientConnection]]] = deque()
        self._connect_sweep: asyncio.TimerHandle | None = None
        # Pings and pong deadlines of every connection, on one timer.
        self.heartbeat = Heartbeat(
            self.config.ping_interval_ms / 1000, self.config.pong_timeout_ms / 1000
        )

    async def start(self) -> None:
        self.identity.revocations.listeners.append(self.revoked)
        self.hub.on_interrupted = self._backend_interrupted
        await self.hub.start()
        self.hub.on_control(CONTROL_CHANNEL, self._control)
        await self.hub.listen(CONTROL_CHANNEL)
        await self.registry.start()
        await self.redelivery.start()
        for loop in self._loops:
            loop.start()

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.identity.revocations.listeners.remove(self.revoked)
        await self.shutdown_connections()
        for loop in self._loops:
            await loop.stop()
        await self.redelivery.stop()
        await self.registry.stop()
        await self.hub.stop()

    async def shutdown_connections(self, code: int = SHUTTING_DOWN) -> None:
        """Tell every client to go elsewhere (4500), then wait briefly for them to leave."""
        self.closing = True
        if self._connect_sweep is not None:
            self._connect_sweep.cancel()
            self._connect_sweep = None
        self.heartbeat.stop()
        connections = list(self.connections.values())
        connections += [c for _, ref in self._awaiting if (c := ref()) and c.awaiting_connect]
        self._awaiting.clear()
        for connection in connections:
            connection.close(code, "node shutting down")
        if self.finishing:  # and those that were closing already
            await asyncio.wait(set(self.finishing), timeout=5)

    def _backend_interrupted(self) -> None:
        """Redis dropped our pub/sub connection: live events may have been missed.

        Every client is sent away (4500: reconnect at once) and resumes from its last
        position, where the replay either fills the gap or says `recovered: false`.
        Never a silent gap.
        """
        connections = [c for c in self.connections.values() if c.subscriptions]
        if connections:
            log.warning("real-time backend interrupted; clients resume", clients=len(connections))
        for connection in connections:
            connection.close(SHUTTING_DOWN, "real-time backend interrupted; reconnect and resume")

    def revoked(self, kind: str, ids: Sequence[uuid.UUID]) -> None:
        """End what was authenticated with a revoked credential, on this node: connections
        close with 4001 (after a `disconnect` saying why), SSE streams end.

        ``kind`` is what `apix.identity.revocations` announces: ``session`` (logout,
        password change, role change...), ``organization`` (suspended) or ``api_key``.
        Revocations are rare, so a walk over the node's connections is fine.
        """
        field = _REVOKED_BY[kind]
        gone = frozenset(ids)
        self.revocation_mark += 1
        self._recent_revocations.append((self.revocation_mark, field, gone))
        for connection in list(self.connections.values()):
            principal = connection.principal
            if principal is not None and getattr(principal, field) in gone:
                try:
                    connection.revoke()
                except Exception:  # the others are still closed
                    log.exception("could not close a revoked connection", id=connection.id)
        for stream in list(self.streams):
            if getattr(stream.principal, field) in gone:
                stream.end()

    def revoked_since(self, mark: int, principal: Principal) -> bool:
        """Whether a revocation heard after ``mark`` (a `revocation_mark` read before
        authenticating) names ``principal``: for what authenticated while it was walked,
        and joins `connections` or `streams` only now."""
        if mark == self.revocation_mark:
            return False
        recent = self._recent_revocations
        if not recent or recent[0][0] > mark + 1:  # more came than are remembered
            return True
        return any(n > mark and getattr(principal, f) in gone for n, f, gone in recent)

    def _control(self, message: dict[str, Any]) -> None:
        connection = self.connections.get(str(message.get("kick")))
        if connection is not None:
            connection.close(int(message.get("code", KICKED)), "disconnected by an administrator")

    def expect_connect(self, connection: ClientConnection) -> None:
        """Close ``connection`` with 4008 unless its `connect` comes in time (PROTOCOL.md
        section 3).

        One timer for the node, not one per connection (in a connect storm, a timer made
        and cancelled for every connection was 2% of the node's time): every connection
        gets the same time, so the queue in arrival order is in deadline order too, and a
        sweep closes what is due, at most a twentieth of the time late.
        """
        loop = asyncio.get_running_loop()
        timeout = self.config.connect_timeout_ms / 1000
        # A weak reference: a connection that is gone before its deadline is not kept.
        self._awaiting.append((loop.time() + timeout, weakref.ref(connection)))
        if self._connect_sweep is None:
            self._connect_sweep = loop.call_later(timeout, self._sweep_connects)

    def _sweep_connects(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        awaiting = self._awaiting
        self._connect_sweep = None
        try:
            while awaiting and awaiting[0][0] <= now:
                connection = awaiting.popleft()[1]()
                if connection is not None and connection.awaiting_connect:
                    connection.close(CONNECT_TIMEOUT, "no connect in time")
        finally:
            if awaiting:  # even if a close failed: the others still get theirs
                late = self.config.connect_timeout_ms / 1000 / 20
                delay = max(awaiting[0][0] - now, late)
                self._connect_sweep = loop.call_later(delay, self._sweep_connects)

    def next_save_slice(self) -> int:
        self._accepted += 1
        return self._accepted % _SESSION_SLICES

    async def _save_sessions(self) -> None:
        """Positions of sessions that moved, saved every few seconds (exactly at close);
        each run saves one slice of the connections."""
        self._save_slice = turn = (self._save_slice + 1) % _SESSION_SLICES
        changed = []
        for connection in list(self.slices[turn].values()):
            positions = connection.positions()
            if positions and positions != connection.saved_positions:
                connection.saved_positions = positions
                changed.append(connection)
        if changed:
            await self.sessions.save(changed)

    async def _message_failed(
        self, channel: ChannelRef, principal: Principal | None, data: dict[str, Any]
    ) -> None:
        if channel.tenant == channel_registry.PLATFORM:
            return
        if self.probe is not None:
            self.probe.dead_lettered(channel.tenant, channel.name)
        monitor = ChannelRef(
            "monitor", channel_registry.NAMESPACES["monitor"], None, channel.tenant
        )
        await self.broker.publish(monitor, "message.failed", data)

    async def _refresh_presence(self) -> None:
        await self.presence.refresh(
            [
                (sub.channel, connection.id)
                for connection in self.connections.values()
                for sub in connection.subscriptions.values()
                if sub.presence
            ]
        )

    async def attach(
        self, sub: Subscription, *, since: Position | None, last: int
    ) -> tuple[Snapshot, bool, list[StoredEvent]]:
        """Register ``sub`` (buffering), then read what it must replay.

        The caller sends the replay and calls `Hub.go_live` without awaiting in between,
        so replay and live events meet in offset order.
        """
        await self.hub.add(sub)
        try:
            snapshot = await self.broker.read(
                sub.channel,
                after=since.offset if since else None,
                last=None if since else last,
            )
        except BaseException:
            await self.hub.remove(sub)
            raise
        recovered = since is None or snapshot.covers(since.offset, since.epoch)
        if not recovered and since is not None:
            try:
                snapshot, recovered = await self.recover_from_archive(
                    sub.channel, snapshot, since.offset, since.epoch
                )
            except BaseException:
                await self.hub.remove(sub)
                raise
        replay = [e for e in snapshot.events if sub.wants(e.type)] if recovered else []
        sub.advance(
            snapshot.events[-1].offset if recovered and snapshot.events else snapshot.last_offset
        )
        sub.epoch = snapshot.epoch
        return snapshot, recovered, replay

    async def recover_from_archive(
        self,
        channel: ChannelRef,
        snapshot: Snapshot,
        offset: str,
        epoch: str | None,
        limit: int | None = None,
    ) -> tuple[Snapshot, bool]:
        """Complete a stream read that no longer reaches back to ``offset`` from the archive.

        Returns the snapshot with the archived events put in front, and whether the whole
        gap could be filled (same epoch, archive caught up, within retention and
        `max_archive_replay`). With ``limit`` (a page of history), only the first ``limit``
        archived events are read.
        """
        retention_ms = self.settings.worker.archive_retention_days * 86_400_000
        if (
            not self.settings.worker.archive
            or not snapshot.archive_covers(epoch)
            or snapshot.trimmed is None
            or offset_key(offset)[0] < time.time() * 1000 - retention_ms
        ):
            return snapshot, False
        most = self.config.max_archive_replay if limit is None else limit
        older = await archive.read(
            self.identity.database,
            channel,
            epoch=snapshot.epoch,
            after=offset,
            upto=snapshot.trimmed,
            limit=most + 1 if limit is None else most,
        )
        if len(older) > most:
            return snapshot, False
        return replace(snapshot, events=[*older, *snapshot.events]), True

    def stats(self) -> dict[str, Any]:
        """This node's gateway counters (for status and benchmarks)."""
        hub = self.hub.stats
        connections = list(self.connections.values())
        return {
            "connections": len(connections),
            "subscriptions": sum(len(c.subscriptions) for c in connections),
            "channels": self.hub.channel_count(),
            "events_in": hub.events_in,
            "frames_out": hub.frames_out,
            "fanout_ms_total": round(hub.fanout_seconds * 1000, 3),
            "fanout_batches": hub.batches,
            "writes_saved": hub.writes_saved,
            "send_buffer_bytes_max": max((c.queue.size for c in connections), default=0),
        }

    def monitor_event(self, channel: ChannelRef, event_type: str, data: dict[str, Any]) -> None:
        """A book-keeping event on an organisation's `monitor` channel, not waited for.

        The events of one loop turn go out together, one script run per channel: in a
        connect storm one turn carries hundreds (`connection.established`,
        `subscription.added`), and one run each cost a fifth of a connect's CPU.
        """
        pending = self._monitor_events.get(channel.stream_key)
        if pending is not None:
            pending[1].append((event_type, data))
            return
        if not self._monitor_events:
            asyncio.get_running_loop().call_soon(self._flush_monitor)
        self._monitor_events[channel.stream_key] = (channel, [(event_type, data)])

    def _flush_monitor(self) -> None:
        pending, self._monitor_events = self._monitor_events, {}
        for channel, events in pending.values():
            for start in range(0, len(events), _MONITOR_BATCH):
                self.broker.publish_many_nowait(channel, events[start : start + _MONITOR_BATCH])

    def allows_origin(self, origin: str | None) -> bool:
        allowed = self.settings.server.allowed_origins
        return origin is None or "*" in allowed or origin in allowed

    def open(self, socket: Socket, origin: str | None) -> ClientConnection:
        """A client connection on a socket just upgraded (`connect` is due in time)."""
        return ClientConnection(self, socket, origin)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The ASGI WebSocket endpoint, for servers other than `apix serve` (which runs the
        gateway on `apix.realtime.transport.ApixWebSocketProtocol` instead)."""
        headers = dict(scope.get("headers", []))
        origin = headers.get(b"origin", b"").decode() or None
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if self.closing or not self.allows_origin(origin):
            if self.closing:
                await _refuse_upgrade(scope, send, 503, "unavailable", "node shutting down")
            else:
                await _refuse_upgrade(scope, send, 403, "forbidden", "origin not allowed")
            return
        accept: dict[str, Any] = {"type": "websocket.accept"}
        if SUBPROTOCOL in (scope.get("subprotocols") or []):
            accept["subprotocol"] = SUBPROTOCOL
        await send(accept)
        socket = AsgiSocket(send)
        await socket.serve(receive, self.open(socket, origin))


class ClientConnection:
    """One client's WebSocket, driven by its socket's callbacks (`received`, `lost`).

    Commands run one at a time, in order. Those that need no I/O (ping, pong, ack) run at
    once; the others in a task that lives only while commands are waiting, so an idle
    connection holds no task at all.
    """

    def __init__(self, gateway: Gateway, socket: Socket, origin: str | None) -> None:
        self.gateway = gateway
        self.config = gateway.config
        self.socket = socket
        self.origin = origin
        self.id = f"conn_{secrets.token_hex(12)}"
        self.session = new_session_token()
        self.filters: dict[str, list[str] | None] = {}
        self.saved_positions: list[tuple[str, str]] = []
        self.save_slice = gateway.next_save_slice()
        self.principal: Principal | None = None
        self.record: ConnectionRecord | None = None
        self.subscriptions: dict[str, Subscription] = {}
        self.queue = SendQueue(self.config.send_buffer_bytes, self._overflow, socket)
        self.queue.start(socket.send_text)
        self._publishes: dict[str, AsyncLimiter] = {}
        # Commands: a leaky bucket of `command_burst`, draining at `commands_per_second`
        # (two numbers, not a limiter object per connection).
        self._bucket = 0.0
        self._bucket_at = 0.0
        # Commands that arrived while one was running, and the task running them.
        self._inbox: deque[str | None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._reading_paused = False
        self._ping_ts: int | None = None
        self._ping_sent = 0.0
        self._rtt_shown_at = -_RTT_SHOW_S  # when the live state last showed the latency
        self._bad_frames = 0
        self._limited_in_a_row = 0
        self.close_code: int | None = None
        # Set once the connection is closing: cleans up, then waits for the close frame.
        self.finishing: asyncio.Future[None] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}
        # Until its `connect` command starts: the gateway closes it (4008) if that is late.
        self.awaiting_connect = True
        gateway.expect_connect(self)

    def positions(self) -> list[tuple[str, str]]:
        """Where each live subscription stands: what the session save loop compares. One
        still being attached is left out: its `subscribe` saves the session once it is
        live, so the loop cannot save it a second time meanwhile."""
        return [(s.last_offset, s.acked) for s in self.subscriptions.values() if s.buffer is None]

    # --- lifecycle ----------------------------------------------------------------------

    def received(self, text: str | None) -> None:
        """A message from the client (``None``: a binary one)."""
        if self.finishing is not None:
            return
        if self._worker is not None:
            if self._inbox is None:
                self._inbox = deque()
            self._inbox.append(text)
            if len(self._inbox) >= _INBOX_PAUSE and not self._reading_paused:
                self._reading_paused = True
                self.socket.pause_reading()
            return
        command = self._parse(text)
        if command is not None and not self._instant(command):
            self._worker = asyncio.get_running_loop().create_task(self._work(command))

    def lost(self, code: int) -> None:
        """The socket closed (the client's close ``code``, or 1006 when it dropped)."""
        if self.finishing is None:
            self.queue.close()
            self._finish_with(code, None)

    def close(self, code: int, reason: str = "", *, flush: bool = False) -> None:
        """Close with ``code`` (idempotent).

        With ``flush`` the frames already queued (the error reply that explains the close)
        are sent first, for a moment at most; otherwise they are dropped (slow consumers,
        kicks, shutdown).
        """
        if self.finishing is not None:
            return
        if flush and self.queue.busy:
            self._finish_with(code, self._flush_then_close(code, reason))
            return
        self.queue.close()
        self.socket.close(code, reason)
        self._finish_with(code, None)

    def _finish_with(self, code: int, closing: Coroutine[Any, Any, None] | None) -> None:
        self.close_code = code
        for timer in self._timers.values():
            timer.cancel()
        sending = asyncio.ensure_future(closing) if closing is not None else None
        self.finishing = finishing = asyncio.ensure_future(self._finish(sending))
        self.gateway.finishing.add(finishing)
        finishing.add_done_callback(self.gateway.finishing.discard)

    async def _finish(self, closing: asyncio.Future[None] | None) -> None:
        """Clean up once the command under way (if any) is done; then see the close out."""
        worker = self._worker
        if worker is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(worker)
        await self._cleanup()
        if closing is not None:
            try:
                # A client that never reads cannot hold the socket open.
                await asyncio.wait_for(closing, _CLOSE_TIMEOUT_S)
            except TimeoutError:
                self.socket.abort()
            except Exception:  # noqa: S110 - the socket is gone either way
                pass

    async def _flush_then_close(self, code: int, reason: str) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.queue.wait_empty(), _FLUSH_TIMEOUT_S)
        self.queue.close()
        self.socket.close(code, reason)

    def _overflow(self, dropped: list[str]) -> None:
        """Close 4011. Positions moved when the dropped frames were queued, but they were
        never sent: move them back, so that a resume replays them."""
        first: dict[str, tuple[int, int]] = {}
        for frame in dropped:
            at = event_position(frame)
            if at is not None and (at[0] not in first or at[1] < first[at[0]]):
                first[at[0]] = at[1]
        for name, (ms, seq) in first.items():
            sub = self.subscriptions.get(name)
            if sub is not None and (ms, seq) <= sub.last_key:
                sub.advance(offset_before(f"{ms}-{seq}"))
        self.close(SLOW_CONSUMER, "slow consumer")

    async def _cleanup(self) -> None:
        gateway = self.gateway
        if gateway.connections.pop(self.id, None) is not None and self.record is not None:
            _uncount(gateway.census, (self.record.org_id, self.record.client_type))
        gateway.slices[self.save_slice].pop(self.id, None)
        # Exact positions for a resume within the window, captured before the subscriptions
        # go (presence leaves are announced first; the session is written after).
        saved = session_snapshot(self) if self.principal is not None else None
        for sub in list(self.subscriptions.values()):
            await self._drop_subscription(sub, announce=False)
        if saved is not None:
            with contextlib.suppress(Exception):
                await gateway.sessions.save_snapshot(self.session, saved)
        if self.record is not None and self.principal is not None:
            with contextlib.suppress(Exception):
                await gateway.registry.disconnected(self.record, self.close_code or 1000)
                self._monitor(
                    "connection.disconnected",
                    {"connection_id": self.id, "code": self.close_code or 1000},
                )

    # --- frames -------------------------------------------------------------------------

    async def _work(self, command: Command) -> None:
        """Run ``command``, then those that queued up meanwhile, in order."""
        try:
            next_command: Command | None = command
            while next_command is not None:
                if not self._instant(next_command):
                    await self._execute(next_command)
                next_command = None
                inbox = self._inbox
                while inbox and next_command is None and self.finishing is None:
                    next_command = self._parse(inbox.popleft())
                    if self._reading_paused and len(inbox) < _INBOX_PAUSE // 2:
                        self._reading_paused = False
                        self.socket.resume_reading()
        finally:
            self._worker = None
            self._inbox = None
            if self._reading_paused:
                self._reading_paused = False
                self.socket.resume_reading()

    def _parse(self, text: str | None) -> Command | None:
        """A frame checked and validated as a command, or None (answered or closed)."""
        if text is None:
            self._protocol_error(None, "frames must be UTF-8 JSON text")
            return None
        if len(text) > self.config.max_frame_bytes:
            self.close(TOO_LARGE, "frame too large")
            return None
        try:
            frame = orjson.loads(text)
        except orjson.JSONDecodeError:
            self._protocol_error(None, "frame is not valid JSON")
            return None
        if not isinstance(frame, dict):
            self._protocol_error(None, "frame must be a JSON object")
            return None
        command_id = frame.get("id")
        if not isinstance(command_id, int | str) or isinstance(command_id, bool):
            command_id = None
        op = frame.get("op")
        if op not in COMMAND_OPS:
            self._protocol_error(command_id, f"unknown op {op!r}")
            return None
        self._bad_frames = 0
        if self.principal is None and op != "connect":
            self._error(command_id, "unauthorized", "the first command must be connect")
            self.close(UNAUTHORIZED, "unauthorized", flush=True)
            return None
        if self.principal is not None and not self._admit(command_id):
            return None
        if op == "pong" and type(ts := frame.get("ts")) is int:
            # The heartbeat, every connection's most frequent frame: what validating it
            # as a `PongCommand` would give (its other fields are ignored there too).
            self._pong(ts)
            return None
        try:
            command: Command = _commands.validate_python(frame)
        except ValidationError as exc:
            self._error(command_id, "bad_request", _describe(exc))
            return None
        return command

    def _instant(self, command: Command) -> bool:
        """Run ``command`` now if it needs no I/O (ping, pong, ack); whether it did."""
        try:
            match command:
                case PingCommand():
                    self._reply(command.id, {"ts": int(time.time() * 1000)})
                case PongCommand():
                    self._pong(command.ts)
                case AckCommand():
                    self._ack(command)
                case _:
                    return False
        except AppError as exc:
            self._error(command.id, _protocol_code(exc), exc.message)
        return True

    async def _execute(self, command: Command) -> None:
        try:
            await self._dispatch(command)
        except AppError as exc:
            self._error(command.id, _protocol_code(exc), exc.message)
        except Exception:
            op = type(command).__name__
            log.exception("gateway: command failed", command=op, connection_id=self.id)
            self._error(command.id, "internal", "internal error")

    def _protocol_error(self, command_id: int | str | None, message: str) -> None:
        self._error(command_id, "bad_request", message)
        self._bad_frames += 1
        if self._bad_frames >= 3:
            self.close(PROTOCOL_ERROR, "protocol error", flush=True)

    def _admit(self, command_id: int | str | None) -> bool:
        """Commands per connection: a leaky bucket of `command_burst`, draining at
        `commands_per_second`. Past it, a command gets `rate_limited`; a client that keeps
        going for a whole burst's worth of refusals is closed with 4029."""
        config = self.config
        now = time.monotonic()
        drained = (now - self._bucket_at) * config.commands_per_second
        self._bucket_at = now
        level = max(0.0, self._bucket - drained)
        if level + 1 <= config.command_burst:
            self._bucket = level + 1
            self._limited_in_a_row = 0
            return True
        self._bucket = level
        self._limited_in_a_row += 1
        self._error(command_id, "rate_limited", "too many commands; slow down")
        if self._limited_in_a_row >= config.command_burst:
            self.close(RATE_LIMITED, "rate limited", flush=True)
        return False

    def _reply(self, command_id: int | str | None, result: dict[str, Any]) -> None:
        if command_id is not None:
            self.queue.push_unbounded(
                dumps({"op": "reply", "id": command_id, "ok": True, "result": result}).decode()
            )

    def _error(self, command_id: int | str | None, code: str, message: str) -> None:
        frame: dict[str, Any] = {
            "op": "reply",
            "ok": False,
            "error": {"code": code, "message": message},
        }
        if command_id is not None:
            frame["id"] = command_id
        self.queue.push_unbounded(dumps(frame).decode())

    # --- commands -----------------------------------------------------------------------

    async def _dispatch(self, command: Command) -> None:
        match command:
            case ConnectCommand():
                await self._connect(command)
            case SubscribeCommand():
                await self._subscribe(command)
            case UnsubscribeCommand():
                await self._unsubscribe(command)
            case PublishCommand():
                await self._publish(command)
            case HistoryCommand():
                await self._history(command)
            case PresenceCommand():
                await self._presence(command)
            case RefreshCommand():
                await self._refresh(command)

    async def _connect(self, command: ConnectCommand) -> None:
        if self.principal is not None:
            raise BadRequest("already connected")
        self.awaiting_connect = False
        mark = self.gateway.revocation_mark
        try:
            principal = await identity.authenticate(self.gateway.identity, command.token)
        except identity_errors.TokenExpired:
            self._error(command.id, "token_expired", "the token has expired")
            self.close(UNAUTHORIZED, "token expired", flush=True)
            return
        except AppError as exc:
            self._error(command.id, "unauthorized", exc.message)
            self.close(UNAUTHORIZED, "unauthorized", flush=True)
            return
        if principal.org_id is None:
            self._error(command.id, "forbidden", "switch to an organization to connect")
            self.close(UNAUTHORIZED, "forbidden", flush=True)
            return
        if self.origin is not None and not await self._org_allows_origin(principal.org_id):
            self._error(command.id, "forbidden", "origin not allowed for this organization")
            self.close(UNAUTHORIZED, "forbidden", flush=True)
            return
        gateway = self.gateway
        if gateway.closing:  # shut down while the token was checked: go elsewhere
            self.close(SHUTTING_DOWN, "node shutting down")
            return
        if gateway.revoked_since(mark, principal):  # revoked while it was checked
            self._error(command.id, "unauthorized", "the credential was revoked")
            self.close(UNAUTHORIZED, "unauthorized", flush=True)
            return
        # No await from here until it is in `connections`, where revocations find it.
        self.principal = principal
        now = datetime.now(UTC)
        self.record = ConnectionRecord(
            id=self.id,
            org_id=principal.org_id,
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            client_type=command.client.type,
            client_name=command.client.name,
            client_version=command.client.version,
            node=gateway.node,
            connected_at=now,
            last_heartbeat_at=now,
            metadata={"origin": self.origin} if self.origin else {},
        )
        gateway.connections[self.id] = self
        gateway.census[(principal.org_id, command.client.type)] += 1
        gateway.slices[self.save_slice][self.id] = self
        if gateway.probe is not None:
            self.queue.label = Label(str(principal.org_id), command.client.type)
            self.queue.probe = gateway.probe
        await gateway.registry.connected(self.record)
        if self.finishing is not None:  # closed meanwhile (kicked, revoked, the node stopping)
            return  # no timer is armed that the close would not cancel
        gateway.heartbeat.schedule(self)
        self._schedule_expiry()
        restored, opened = await self._resume(command.resume) if command.resume else ([], [])
        self._reply(
            command.id,
            {
                "type": "connection.established",
                "connection_id": self.id,
                "session": self.session,
                "org_id": str(principal.org_id),
                "user_id": str(principal.user_id) if principal.user_id else None,
                "node": gateway.node,
                "ping_interval_ms": self.config.ping_interval_ms,
                "token_expires_at": principal.token_expires_at,
                "resumed": bool(command.resume) and self.session == command.resume,
                "subscriptions": restored,
            },
        )
        for each in opened:
            self._go_live(each)
        for sub, snapshot, _, _ in opened:
            await self._opened(sub, snapshot.epoch)
        self._monitor(
            "connection.established",
            {
                "connection_id": self.id,
                "user_id": str(principal.user_id) if principal.user_id else None,
                "client_type": command.client.type,
                "node": gateway.node,
            },
        )

    async def _resume(
        self, token: str
    ) -> tuple[list[dict[str, Any]], list[tuple[Subscription, Snapshot, bool, list[StoredEvent]]]]:
        """Restore a session's subscriptions from where they were (not yet live).

        A session belongs to its principal: another user's, key's or organisation's token
        cannot resume it (the connection then simply starts a new session).
        """
        assert self.principal is not None  # noqa: S101
        saved = await self.gateway.sessions.load(token)
        if saved is None or not saved.belongs_to(self.principal):
            return [], []
        self.session = token
        restored: list[dict[str, Any]] = []
        opened = []
        for s in saved.subscriptions:
            since = Position(offset=s.acked if s.ack else s.offset, epoch=s.epoch or None)
            try:
                each = await self._open(
                    s.channel, types=s.types, presence=s.presence, ack=s.ack, since=since, last=0
                )
            except AppError as exc:  # e.g. the permission was withdrawn meanwhile
                restored.append(
                    {"channel": s.channel, "recovered": False, "replayed": 0, "error": exc.code}
                )
                continue
            if each[0].presence:
                await self.gateway.presence.join(each[0].channel, self._member(), each[1].epoch)
            opened.append(each)
            restored.append(
                {"channel": each[0].channel.name, "recovered": each[2], "replayed": len(each[3])}
            )
        return restored, opened

    async def _org_allows_origin(self, org_id: uuid.UUID) -> bool:
        async with self.gateway.identity.database.transaction(org_id) as uow:
            org = await uow.session.get(Organization, org_id)
        allowed = org.allowed_origins if org is not None else []
        return not allowed or self.origin in allowed

    def _channel(self, name: str) -> ChannelRef:
        assert self.principal is not None  # noqa: S101 - commands run after connect
        return channel_registry.parse(name, self.principal)

    async def _subscribe(self, command: SubscribeCommand) -> None:
        opened = await self._open(
            command.channel,
            types=command.filter.types if command.filter else None,
            presence=command.presence,
            ack=command.ack,
            since=command.since,
            last=command.last,
        )
        sub, snapshot, recovered, replay = opened
        if sub.presence:
            # Listed by the time the subscription is confirmed.
            await self.gateway.presence.join(sub.channel, self._member(), snapshot.epoch)
        # From here to go_live nothing awaits: the replay and the live events buffered
        # meanwhile are merged in offset order before any later event is dispatched.
        self._reply(
            command.id,
            {
                "type": "subscription.added",
                "channel": sub.channel.name,
                "position": {"offset": snapshot.last_offset, "epoch": snapshot.epoch},
                "recovered": recovered,
                "replayed": len(replay),
            },
        )
        self._go_live(opened)
        await self._opened(sub, snapshot.epoch)

    async def _open(
        self,
        name: str,
        *,
        types: list[str] | None,
        presence: bool,
        ack: bool,
        since: Position | None,
        last: int,
    ) -> tuple[Subscription, Snapshot, bool, list[StoredEvent]]:
        """Check and attach a subscription (buffering live events); not yet live."""
        principal = self.principal
        assert principal is not None  # noqa: S101
        channel = self._channel(name)
        channel_registry.check_subscribe(principal, channel)
        if channel.name in self.subscriptions:
            raise Conflict(f"already subscribed to {channel.name}")
        if len(self.subscriptions) >= self.config.max_subscriptions:
            raise TooLarge(f"at most {self.config.max_subscriptions} subscriptions per connection")
        sub = Subscription(
            connection_id=self.id,
            channel=channel,
            outbox=self.queue,
            types=compile_filter(types),
            presence=presence,
            ack=ack,
        )
        if ack:
            sub.on_deliver = self.gateway.redelivery.delivered
        self.subscriptions[channel.name] = sub
        self.filters[channel.name] = types
        org = principal.org_id
        assert org is not None  # noqa: S101 - `connect` refuses a principal without one
        self.gateway.subscribed[org] += 1
        try:
            snapshot, recovered, replay = await self.gateway.attach(sub, since=since, last=last)
        except BaseException:
            self.subscriptions.pop(channel.name, None)
            self.filters.pop(channel.name, None)
            _uncount(self.gateway.subscribed, org)
            raise
        if ack:
            # Everything up to the starting position counts as acknowledged; replayed
            # events are delivered (and tracked) like live ones.
            sub.acked = since.offset if since and recovered else snapshot.last_offset
            if replay and not since:
                sub.acked = offset_before(replay[0].offset)
        return sub, snapshot, recovered, replay

    def _go_live(self, opened: tuple[Subscription, Snapshot, bool, list[StoredEvent]]) -> None:
        sub, snapshot, _, replay = opened
        for event in replay:
            self.queue.push_unbounded(
                event_frame(sub.channel.name, event.offset, snapshot.epoch, event.payload)
            )
            if sub.on_deliver is not None:
                sub.on_deliver(sub, event.offset)
        self.gateway.hub.go_live(sub, after=sub.last_offset)

    async def _opened(self, sub: Subscription, epoch: str) -> None:
        """Book-keeping once a subscription is live: registry, presence, monitor, session."""
        gateway = self.gateway
        assert self.record is not None  # noqa: S101
        self.record.channels = sorted(self.subscriptions)
        self._monitor("subscription.added", {"connection_id": self.id, "channel": sub.channel.name})
        self.saved_positions = self.positions()  # the save loop has nothing new to write
        try:
            # One round trip for all three, shared with whatever else the node is doing.
            await asyncio.gather(
                gateway.registry.update_live(self.record),
                gateway.registry.subscribed(sub.channel, self.id, True),
                gateway.sessions.save([self]),
            )
        except BaseException:
            self.saved_positions = []  # not saved: the loop's next turn saves it
            raise

    def _ack(self, command: AckCommand) -> None:
        channel = self._channel(command.channel)
        sub = self.subscriptions.get(channel.name)
        if sub is None or not sub.ack:
            raise NotFound(f"no ack subscription to {channel.name}")
        self.gateway.redelivery.acknowledged(sub, command.offset)
        self._reply(command.id, {"channel": channel.name, "offset": sub.acked})

    async def _unsubscribe(self, command: UnsubscribeCommand) -> None:
        channel = self._channel(command.channel)
        sub = self.subscriptions.get(channel.name)
        if sub is None:
            raise NotFound(f"not subscribed to {channel.name}")
        await self._drop_subscription(sub, announce=True)
        self._reply(command.id, {"type": "subscription.removed", "channel": channel.name})

    async def _drop_subscription(self, sub: Subscription, *, announce: bool) -> None:
        gateway = self.gateway
        dropped = self.subscriptions.pop(sub.channel.name, None)
        if dropped is not None and self.principal is not None:
            _uncount(gateway.subscribed, self.principal.org_id)
        self.filters.pop(sub.channel.name, None)
        gateway.redelivery.forget(sub)
        with contextlib.suppress(Exception):
            await gateway.hub.remove(sub)
            await gateway.registry.subscribed(sub.channel, self.id, False)
            if sub.presence:
                epoch = await gateway.broker.epoch(sub.channel)
                await gateway.presence.leave(sub.channel, self._member(), epoch)
            if self.record is not None and announce:
                self.record.channels = sorted(self.subscriptions)
                await gateway.registry.update_live(self.record)
            self._monitor(
                "subscription.removed", {"connection_id": self.id, "channel": sub.channel.name}
            )

    async def _publish(self, command: PublishCommand) -> None:
        principal = self.principal
        assert principal is not None  # noqa: S101
        channel = self._channel(command.channel)
        channel_registry.check_publish(principal, channel)
        # Per channel: `publishes_per_second`, in-process (a connection lives on one node).
        limiter = self._publishes.get(channel.name)
        if limiter is None:
            rate = self.config.publishes_per_second
            limiter = self._publishes[channel.name] = AsyncLimiter(rate, 1.0)
        if not limiter.has_capacity():
            raise RateLimited("too many publishes on this channel; slow down")
        await limiter.acquire()  # returns at once: there is capacity
        result = await service.publish(
            self.gateway.broker,
            principal,
            channel,
            command.type,
            command.data,
            idempotency_key=command.idempotency_key,
        )
        self._reply(command.id, result)

    async def _history(self, command: HistoryCommand) -> None:
        principal = self.principal
        assert principal is not None  # noqa: S101
        channel = self._channel(command.channel)
        channel_registry.check_subscribe(principal, channel)
        result = await service.history(
            self.gateway.broker,
            channel,
            since=command.since.offset if command.since else None,
            epoch=command.since.epoch if command.since else None,
            limit=command.limit,
            reverse=command.reverse,
            recover=self.gateway.recover_from_archive,
        )
        self._reply(command.id, result)

    async def _presence(self, command: PresenceCommand) -> None:
        principal = self.principal
        assert principal is not None  # noqa: S101
        channel = self._channel(command.channel)
        channel_registry.check_subscribe(principal, channel)
        self._reply(command.id, {"clients": await self.gateway.presence.members(channel)})

    async def _refresh(self, command: RefreshCommand) -> None:
        principal = self.principal
        assert principal is not None  # noqa: S101
        mark = self.gateway.revocation_mark
        try:
            fresh = await identity.authenticate(self.gateway.identity, command.token)
        except identity_errors.TokenExpired:
            raise identity_errors.TokenExpired("the new token has expired") from None
        except AppError as exc:
            raise Unauthorized(exc.message) from None
        same = (fresh.user_id, fresh.api_key_id, fresh.org_id) == (
            principal.user_id,
            principal.api_key_id,
            principal.org_id,
        )
        if not same:
            raise Forbidden("a refresh token must be for the same principal")
        if self.gateway.revoked_since(mark, fresh):
            raise Unauthorized("the token was revoked")
        self.principal = fresh
        self._schedule_expiry()
        self._reply(command.id, {"token_expires_at": fresh.token_expires_at})

    # --- heartbeat and expiry -------------------------------------------------------------

    def ping(self, ts: int, frame: bytes) -> bool:
        """The node's heartbeat pings (`apix.realtime.heartbeat`)."""
        if self.finishing is not None:
            return False
        self._ping_ts = ts
        self._ping_sent = time.monotonic()  # each its own: a sweep may ping thousands
        self.queue.push_unbounded(f'{{"op":"ping","ts":{ts}}}', framed=frame)
        return True

    def pong_overdue(self, ts: int) -> None:
        if ts == self._ping_ts:
            self.close(HEARTBEAT_TIMEOUT, "heartbeat timeout")

    def _pong(self, ts: int) -> None:
        if self._ping_ts is None or ts != self._ping_ts:
            return
        self._ping_ts = None
        if self.record is not None:
            rtt = time.monotonic() - self._ping_sent
            if self.queue.probe is not None and self.queue.label is not None:
                self.queue.probe.rtt(self.queue.label, rtt)
            self.record.rtt_ms = round(rtt * 1000, 3)
            self.record.last_heartbeat_at = datetime.now(UTC)
            # The connection list (Redis) and the connection record (PostgreSQL) show the
            # measured latency and the heartbeat at once the first time, then once a minute:
            # at 50k connections a write per pong was 2,000 Redis writes and 2,000 row
            # updates a second. The record's final state is written at the disconnect.
            now = time.monotonic()
            if now - self._rtt_shown_at >= _RTT_SHOW_S:
                self._rtt_shown_at = now
                self.gateway.registry.show_live(self.record)
        self.gateway.heartbeat.schedule(self)

    def _schedule_expiry(self) -> None:
        assert self.principal is not None  # noqa: S101
        if "expiry" in self._timers:
            self._timers.pop("expiry").cancel()
        expires = self.principal.token_expires_at
        if expires is None:
            return
        delay = max(0.0, expires / 1000 - time.time())
        loop = asyncio.get_running_loop()
        self._timers["expiry"] = loop.call_later(delay, self._expire)

    def _expire(self) -> None:
        self._say_then_close(
            '{"op":"disconnect","code":4003,"reason":"token expired","reconnect":true}',
            TOKEN_EXPIRED,
            "expired",
        )

    def revoke(self) -> None:
        """Its credential was revoked: say so, then close with 4001 (do not reconnect
        without a new credential)."""
        self._say_then_close(
            '{"op":"disconnect","code":4001,"reason":"credential revoked","reconnect":false}',
            UNAUTHORIZED,
            "revoked",
        )

    def _say_then_close(self, frame: str, code: int, reason: str) -> None:
        # Bypass the queue's order: the client must see why it is being closed.
        if self.finishing is not None:
            return
        self.queue.close()
        self._finish_with(code, self._send_then_close(frame, code, reason))

    async def _send_then_close(self, frame: str, code: int, reason: str) -> None:
        with contextlib.suppress(Exception):
            await self.socket.send_text(frame)
        self.socket.close(code, reason)

    # --- helpers ------------------------------------------------------------------------

    def _member(self) -> dict[str, Any]:
        principal = self.principal
        assert principal is not None  # noqa: S101
        assert self.record is not None  # noqa: S101
        return {
            "connection_id": self.id,
            "user_id": str(principal.user_id) if principal.user_id else None,
            "client_type": self.record.client_type,
            "info": {"name": self.record.client_name} if self.record.client_name else {},
        }

    def _monitor(self, event_type: str, data: dict[str, Any]) -> None:
        """Publish on the organisation's `monitor` channel, without waiting for it."""
        principal = self.principal
        if principal is None:
            return
        channel = channel_registry.parse("monitor", principal)
        self.gateway.monitor_event(channel, event_type, data)


async def _refuse_upgrade(scope: Scope, send: Send, status: int, code: str, message: str) -> None:
    """Answer the upgrade with an HTTP error in the error model (or a bare 403 where the
    server lacks the ASGI WebSocket denial-response extension)."""
    if "websocket.http.response" not in scope.get("extensions", {}):
        await send({"type": "websocket.close", "code": 1008})
        return
    body = dumps(error_content(code, message))
    await send(
        {
            "type": "websocket.http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "websocket.http.response.body", "body": body})


def _describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"][1:]) or "frame"
    return f"{where}: {first['msg']}"


def _protocol_code(exc: AppError) -> str:
    return {
        "unauthorized": "unauthorized",
        "invalid_token": "unauthorized",
        "token_expired": "token_expired",
        "forbidden": "forbidden",
        "not_found": "not_found",
        "rate_limited": "rate_limited",
        "too_large": "too_large",
        "conflict": "conflict",
        "unrecoverable": "unrecoverable",
    }.get(exc.code, "bad_request" if exc.status_code < 500 else "internal")


def _uncount(counter: Counter[Any], key: Any) -> None:
    """One fewer of ``key``; a count that reaches zero goes (a gauge lists what is there)."""
    left = counter[key] - 1
    if left > 0:
        counter[key] = left
    else:
        del counter[key]

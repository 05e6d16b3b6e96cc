"""Traffic for fault tests: a publisher that retries until the gateway acknowledges, the
subscribers (the `apix.client` SDK, and an `ack: true` client that resumes its session), and
the ledger that counts lost, duplicated and out-of-order events.

Every event carries its number ``n`` and an idempotency key derived from it, so a publish
retried after a failure (on any node) is stored once, and every acknowledged event has one
known offset. Subscribers record what the *application* sees: after the de-duplication by
offset that `apix.client` applies (`Position.precedes`), never the raw redeliveries.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect

from apix.client import ApixClient, Event, Position, Subscription

EVENT_TYPE = "fault.event"

# --- publishing -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Published:
    n: int
    channel: str
    offset: str
    epoch: str
    attempts: int
    duplicate: bool  # a retry the gateway had stored already (idempotency key)


@dataclass
class HttpPublisher:
    """Publishes events over the HTTP API, retrying each (same idempotency key, next node)
    until it is acknowledged with 201 or ``give_up_s`` passes."""

    bases: Sequence[str]
    headers: Mapping[str, str]
    concurrency: int = 8
    give_up_s: float = 30.0
    results: dict[int, Published] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    retried: int = 0
    started: float = 0.0
    finished: float = 0.0
    _down_until: dict[int, float] = field(default_factory=dict)
    _waiters: dict[int, asyncio.Event] = field(default_factory=dict)

    async def run(self, plan: Sequence[tuple[int, str]], *, rate: float | None = None) -> None:
        """Publish ``plan`` ((n, channel) pairs), at most ``rate`` events per second."""
        self.started = time.monotonic()
        todo = iter(enumerate(plan))
        limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=None)
        clients = [
            httpx.AsyncClient(base_url=base, headers=dict(self.headers), timeout=10, limits=limits)
            for base in self.bases
        ]

        async def worker() -> None:
            for index, (n, channel) in todo:
                if rate is not None:
                    delay = self.started + index / rate - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                await self._publish(clients, n, channel)

        try:
            await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        finally:
            for client in clients:
                await client.aclose()
            self.finished = time.monotonic()

    async def _publish(self, clients: list[httpx.AsyncClient], n: int, channel: str) -> None:
        body = {"type": EVENT_TYPE, "data": {"n": n}, "idempotency_key": f"fault-{n}"}
        deadline = time.monotonic() + self.give_up_s
        for attempt in itertools.count(1):
            index = self._pick(n + attempt - 1)
            try:
                response = await clients[index].post(
                    f"/api/v1/apix/channels/{channel}/events", json=body
                )
                status = str(response.status_code)
            except httpx.TransportError as exc:
                response, status = None, type(exc).__name__
                # As a load balancer's health check would: leave that node alone a while.
                self._down_until[index] = time.monotonic() + 1.0
            self.statuses[status] += 1
            if response is not None and response.status_code == 201:
                result = response.json()
                self.results[n] = Published(
                    n, channel, result["offset"], result["epoch"], attempt, result["duplicate"]
                )
                for count, reached in list(self._waiters.items()):
                    if len(self.results) >= count:
                        reached.set()
                return
            if time.monotonic() > deadline:
                return  # never acknowledged: not owed to anyone
            self.retried += 1
            await asyncio.sleep(0.05 * min(attempt, 10))

    async def wait_acknowledged(self, count: int) -> None:
        """Return once ``count`` events are acknowledged."""
        reached = self._waiters.setdefault(count, asyncio.Event())
        if len(self.results) >= count:
            reached.set()
        await reached.wait()

    @property
    def duplicates(self) -> int:
        return sum(p.duplicate for p in self.results.values())

    def _pick(self, turn: int) -> int:
        """The node for this try: in turn, skipping nodes that just failed (unless all did)."""
        now = time.monotonic()
        for step in range(len(self.bases)):
            index = (turn + step) % len(self.bases)
            if self._down_until.get(index, 0.0) <= now:
                return index
        return turn % len(self.bases)

    @property
    def acknowledged(self) -> int:
        return len(self.results)


def plan_events(count: int, channels: Sequence[str]) -> list[tuple[int, str]]:
    return [(n, channels[n % len(channels)]) for n in range(count)]


# --- what the application sees -----------------------------------------------------------------


@dataclass
class AppStream:
    """One subscriber's view of one channel: the events handed to the application."""

    position: Position | None = None
    seen: list[tuple[str, str | None, int]] = field(default_factory=list)  # offset, epoch, n
    raw_duplicates: int = 0  # frames dropped by the de-duplication (replays, redeliveries)

    def feed(self, event: Event) -> bool:
        """Apply `apix.client`'s rule (an offset not after the position was delivered
        already); return whether the application got the event."""
        position = event.position
        if position is None:
            return False
        if self.position is not None and not self.position.precedes(position):
            self.raw_duplicates += 1
            return False
        self.position = position
        self.record(event)
        return True

    def record(self, event: Event) -> None:
        assert event.offset is not None
        n = event.data.get("n", -1) if isinstance(event.data, dict) else -1
        self.seen.append((event.offset, event.epoch, int(n)))


@dataclass
class Counts:
    expected: int = 0  # acknowledged events x subscribers of their channel
    delivered: int = 0  # events handed to applications
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    unexpected: int = 0  # delivered, but never acknowledged to the publisher

    @property
    def clean(self) -> bool:
        return self.lost == self.duplicated == self.out_of_order == self.unexpected == 0


def tally(published: Mapping[int, Published], streams: Iterable[tuple[str, AppStream]]) -> Counts:
    """Compare each subscriber's stream of one channel with what was acknowledged on it."""
    by_channel: dict[str, set[str]] = {}
    for p in published.values():
        by_channel.setdefault(p.channel, set()).add(p.offset)
    counts = Counts()
    for channel, stream in streams:
        expected = by_channel.get(channel, set())
        counts.expected += len(expected)
        counts.delivered += len(stream.seen)
        offsets = [offset for offset, _, _ in stream.seen]
        numbers = [n for _, _, n in stream.seen]
        counts.duplicated += len(offsets) - len(set(offsets))
        counts.duplicated += len(set(offsets)) - len(set(numbers))  # one n at two offsets
        counts.lost += len(expected - set(offsets))
        counts.unexpected += len(set(offsets) - expected)
        highest = (-1, -1)
        for offset in offsets:
            key = _offset_key(offset)
            if key < highest:
                counts.out_of_order += 1
            highest = max(highest, key)
    return counts


def _offset_key(offset: str) -> tuple[int, int]:
    """Offsets are stream ids: compared as (milliseconds, sequence), never as text."""
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


def caught_up(published: Mapping[int, Published], streams: Iterable[tuple[str, AppStream]]) -> bool:
    """Whether every stream holds as many events as were acknowledged on its channel."""
    per_channel = Counter(p.channel for p in published.values())
    return all(len(stream.seen) >= per_channel[channel] for channel, stream in streams)


async def wait_caught_up(
    published: Mapping[int, Published],
    streams: Sequence[tuple[str, AppStream]],
    timeout_s: float,
) -> float:
    """Wait until `caught_up` (or the timeout); return how long it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if caught_up(published, streams):
            break
        await asyncio.sleep(0.1)
    return time.monotonic() - started


# --- subscribers: the SDK ----------------------------------------------------------------------


class SdkSubscriber:
    """An application on `apix.client`: plain subscriptions, resubscribed with ``since`` by
    the SDK after every drop."""

    def __init__(self, url: str, token: str, channels: Sequence[str]) -> None:
        self.client = ApixClient(
            url, token=token, name="fault-sdk", backoff_initial=0.1, backoff_max=2.0
        )
        self.channels = list(channels)
        self.streams = {channel: AppStream() for channel in channels}
        self.connections: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self.client.connect()
        for channel in self.channels:
            sub = await self.client.subscribe(channel)
            self._tasks.append(asyncio.create_task(self._consume(sub, self.streams[channel])))

    async def _consume(self, sub: Subscription, stream: AppStream) -> None:
        async for event in sub:
            info = self.client.connection
            if info is not None:
                self.connections.add(info.connection_id)
            stream.record(event)

    @property
    def reconnects(self) -> int:
        return max(0, len(self.connections) - 1)

    async def close(self) -> None:
        await self.client.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# --- subscribers: Server-Sent Events -----------------------------------------------------------


class SseSubscriber:
    """A receive-only client of one channel, as a browser's ``EventSource`` behaves: when the
    stream ends it reconnects with ``Last-Event-ID`` (the id of the last event it got), and
    it drops an event whose offset is not after its position (as the example page does)."""

    def __init__(self, base: str, token: str, channel: str) -> None:
        self.base = base
        self.token = token
        self.channel = channel
        self.stream = AppStream()
        self.last_event_id: str | None = None
        self.streams_opened = 0
        self.refused: Counter[int] = Counter()
        self.ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        timeout = httpx.Timeout(10, read=60)
        async with httpx.AsyncClient(base_url=self.base, timeout=timeout) as http:
            while True:
                headers = {"Authorization": f"Bearer {self.token}"}
                if self.last_event_id is not None:
                    headers["Last-Event-ID"] = self.last_event_id
                try:
                    async with http.stream(
                        "GET", "/api/v1/apix/sse", params={"channel": self.channel}, headers=headers
                    ) as response:
                        if response.status_code == 200:
                            self.streams_opened += 1
                            self.ready.set()
                            await self._read(response)
                        else:
                            self.refused[response.status_code] += 1
                except httpx.TransportError:
                    pass
                await asyncio.sleep(random.uniform(0, 0.3))

    async def _read(self, response: httpx.Response) -> None:
        event_id: str | None = None
        data: str | None = None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif not line and data is not None:
                self.stream.feed(Event.from_wire(orjson.loads(data)))
                self.last_event_id, data = event_id, None


# --- subscribers: acknowledged delivery with session resume ---------------------------------


class Refused(Exception):
    """The gateway answered a command with an error."""

    def __init__(self, op: str, code: str, message: str) -> None:
        super().__init__(f"{op} refused: {code}: {message}")
        self.code = code


# Errors that say "not now": a backing service is down, or we go too fast.
_TRANSIENT = frozenset({"internal", "rate_limited"})


@dataclass
class AckStats:
    connections: int = 0
    refused: int = 0  # connections refused with a transient error (a backend is down)
    resumed: int = 0  # reconnects that resumed the session
    not_resumed: int = 0  # reconnects that had to subscribe again
    unrecovered: int = 0  # subscriptions restored with recovered: false
    frames: int = 0
    redeliveries: int = 0  # event frames with attempt > 1
    replayed: int = 0  # events the server replayed after a (re)subscription or resume
    reconnect_s: list[float] = field(default_factory=list)  # drop → subscribed again


class AckSubscriber:
    """A protocol client with ``ack: true`` subscriptions (`apix.client` has none): it acks
    cumulatively every ``ack_interval`` s, and after a drop connects again (trying ``urls``
    in turn, as a load balancer would) with ``resume``, so the server restarts each
    subscription after its last acknowledged event. What it hands to the application goes
    through the SDK's de-duplication (`AppStream.feed`)."""

    _ids = itertools.count(1)

    def __init__(
        self,
        urls: Sequence[str],
        token: str,
        channels: Sequence[str],
        *,
        home: int = 0,
        ack_interval: float = 0.1,
    ) -> None:
        self.urls = list(urls)
        self.url_index = home
        self.token = token
        self.channels = list(channels)
        self.ack_interval = ack_interval
        self.streams = {channel: AppStream() for channel in channels}
        self.session: str | None = None
        self.node: str | None = None
        self.stats = AckStats()
        self.errors: list[str] = []
        self.ready = asyncio.Event()
        self._acked: dict[str, str] = {}
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._live = False  # the current connection got as far as its subscriptions

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        failures = 0
        dropped_at: float | None = None
        while not self._stop.is_set():
            url = self.urls[self.url_index % len(self.urls)]
            try:
                ws = await ws_connect(
                    url, compression=None, ping_interval=None, max_size=None, open_timeout=5
                )
            except (OSError, TimeoutError, websockets.WebSocketException):
                failures += 1
                self.url_index += 1  # that node is down: the next one
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**failures)))
                continue
            failures = 0
            self._live = False
            try:
                await self._serve(ws, dropped_at)
            except (OSError, websockets.ConnectionClosed):
                pass
            except Refused as exc:
                if exc.code not in _TRANSIENT:
                    self.errors.append(str(exc))  # the test reports it
                self.stats.refused += 1
                await asyncio.sleep(random.uniform(0, 0.5))
            finally:
                await ws.close()
            if self._live:
                dropped_at = time.monotonic()

    async def _command(self, ws: ClientConnection, op: str, **fields: Any) -> dict[str, Any]:
        command_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        await ws.send(orjson.dumps({"op": op, "id": command_id, **fields}).decode())
        reply = await asyncio.wait_for(future, 10)
        if not reply.get("ok"):
            raise Refused(op, reply["error"]["code"], reply["error"].get("message", ""))
        result: dict[str, Any] = reply["result"]
        return result

    async def _serve(self, ws: ClientConnection, dropped_at: float | None) -> None:
        reader = asyncio.create_task(self._read(ws))
        acker: asyncio.Task[None] | None = None
        try:
            fields: dict[str, Any] = {"token": self.token, "client": {"type": "API_CLIENT"}}
            if self.session is not None:
                fields["resume"] = self.session
            result = await self._command(ws, "connect", **fields)
            self.stats.connections += 1
            restored: set[str] = set()
            if self.session is not None:
                if result["resumed"]:
                    self.stats.resumed += 1
                    for sub in result["subscriptions"]:
                        if "error" in sub:
                            continue
                        restored.add(sub["channel"])
                        self.stats.replayed += sub["replayed"]
                        if not sub["recovered"]:
                            self.stats.unrecovered += 1
                else:
                    self.stats.not_resumed += 1
            self.session, self.node = result["session"], result["node"]
            for channel in self.channels:
                if channel not in restored:
                    await self._subscribe(ws, channel)
            if dropped_at is not None:
                self.stats.reconnect_s.append(time.monotonic() - dropped_at)
            self._live = True
            self._acked.clear()  # a new connection: send the current ack again
            acker = asyncio.create_task(self._ack_loop(ws))
            self.ready.set()
            await reader
        finally:
            reader.cancel()
            if acker is not None:
                acker.cancel()
            for future in self._pending.values():
                future.cancel()
            self._pending.clear()

    async def _subscribe(self, ws: ClientConnection, channel: str) -> None:
        stream = self.streams[channel]
        fields: dict[str, Any] = {"channel": channel, "ack": True}
        if stream.position is not None:
            fields["since"] = stream.position.to_wire()
        result = await self._command(ws, "subscribe", **fields)
        self.stats.replayed += result["replayed"]
        if not result["recovered"]:
            self.stats.unrecovered += 1
        if stream.position is None or not result["recovered"]:
            # Nothing seen yet: the channel's head is where this subscription starts.
            stream.position = Position.from_wire(result["position"])

    async def _read(self, ws: ClientConnection) -> None:
        try:
            await self._read_frames(ws)
        finally:
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("the connection dropped"))

    async def _read_frames(self, ws: ClientConnection) -> None:
        streams = self.streams
        async for raw in ws:
            frame = orjson.loads(raw)
            self.stats.frames += 1
            op = frame.get("op")
            if op == "event":
                stream = streams.get(frame["channel"])
                if stream is None:
                    continue
                if frame.get("attempt", 1) > 1:
                    self.stats.redeliveries += 1
                stream.feed(Event.from_wire(frame))
            elif op == "reply":
                future = self._pending.pop(frame.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(frame)
            elif op == "ping":
                await ws.send(orjson.dumps({"op": "pong", "ts": frame["ts"]}).decode())

    async def _ack_loop(self, ws: ClientConnection) -> None:
        while True:
            await asyncio.sleep(self.ack_interval)
            for channel, stream in self.streams.items():
                position = stream.position
                if position is None or self._acked.get(channel) == position.offset:
                    continue
                # Without an id: no reply to read (errors would still come back).
                frame = {"op": "ack", "channel": channel, "offset": position.offset}
                await ws.send(orjson.dumps(frame).decode())
                self._acked[channel] = position.offset


# --- results -----------------------------------------------------------------------------------


def report(scenario: str, summary: dict[str, Any]) -> str:
    """Print the run's one-line summary; write it as JSON under ``APIX_FAULTS_RESULTS``."""
    line = f"[faults] {scenario}: " + " ".join(f"{k}={_short(v)}" for k, v in summary.items())
    print(line)  # noqa: T201 - the summary is the point of the run
    folder = os.environ.get("APIX_FAULTS_RESULTS")
    if folder:
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        record = {"scenario": scenario, "finished_at": int(time.time()), **summary}
        (path / f"{scenario}.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
    return line


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_short(v)}" for k, v in value.items()) + "}"
    return str(value)

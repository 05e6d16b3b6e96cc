"""Redis: one asyncio pool per process, with hiredis parsing replies and packing commands."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import hiredis
from redis._parsers import _AsyncHiredisParser
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import InvalidResponse, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from apix.config import RedisSettings
from apix.core.logging import get_logger

log = get_logger("apix.redis")


def create_redis(url: str, settings: RedisSettings) -> Redis:
    # Blocking: past `max_connections` a command waits for a free connection (up to the
    # socket timeout) instead of failing, so a burst of connects queues rather than errors.
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=settings.max_connections,
        timeout=settings.socket_timeout_s,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
    )
    # The class the URL chose (TCP, TLS or Unix socket), packing with hiredis.
    pool.connection_class = _packing_with_hiredis(pool.connection_class)
    return Redis.from_pool(pool)


_PACKING: dict[type[AbstractConnection], type[AbstractConnection]] = {}


def _packing_with_hiredis(base: type[AbstractConnection]) -> type[AbstractConnection]:
    """redis-py's asyncio connections pack commands in Python (about 8 µs for the publish
    script's 19 arguments); hiredis's C packer writes the same bytes in about 1 µs."""
    if base in _PACKING:
        return _PACKING[base]

    class HiredisPacking(base):  # type: ignore[valid-type,misc]
        def pack_command(self, *args: Any) -> list[bytes]:
            first = args[0]
            # A multi-word command name ("CONFIG GET") is split by redis-py's packer.
            if not (b" " in first if isinstance(first, bytes) else " " in first):
                try:
                    return [hiredis.pack_command(args)]
                except TypeError:
                    pass  # a type Redis does not take: redis-py raises its own error
            packed: list[bytes] = super().pack_command(*args)
            return packed

    HiredisPacking.__name__ = HiredisPacking.__qualname__ = f"HiredisPacking{base.__name__}"
    _PACKING[base] = HiredisPacking
    return HiredisPacking


async def ping(client: Redis) -> dict[str, Any]:
    started = time.perf_counter()
    await client.ping()
    latency_ms = (time.perf_counter() - started) * 1000
    info = await client.info("server")
    return {"latency_ms": round(latency_ms, 3), "version": str(info.get("redis_version"))}


class WatchedPubSub(PubSub):
    """redis-py reconnects a dropped pub/sub connection and subscribes again by itself,
    silently: whatever was announced in between never arrives. This says when (on the
    first connection too)."""

    on_reconnect: Callable[[], None] | None = None

    async def on_connect(self, connection: Any) -> None:
        await super().on_connect(connection)
        if self.on_reconnect is not None:
            self.on_reconnect()


class AutoPipeline:
    """Commands issued while round trips are under way share the next one.

    On the hot paths many coroutines each send a command or two: a storm of connects
    (revocation checks, registry and session writes) or of HTTP publishes. One by one, each
    pays a pool checkout, a timeout context and a round trip, about 0.1 ms of CPU in
    redis-py; gathered into one pipeline they pay that once. Nothing waits to fill a batch:
    the first command goes out at the end of the current loop turn, so an idle node adds no
    latency.

    The batches go over one connection of the pipeline's own (`_Line`), whose replies are
    parsed as they arrive and handed out in the order written (Redis answers a connection's
    commands in order, so commands run in the order they were queued). One batch is in
    flight at a time: what is queued meanwhile goes out together once its replies are in.
    With `max_in_flight` above one, batches are pipelined, each written as soon as it is
    formed without waiting for the replies to the one ahead; measured, two in flight made
    smaller batches and more writes, and HTTP publish's rate fell by a tenth to a fifth
    (docs/benchmarks.md). When the connection fails (dropped, no reply in time) every
    command waiting on it fails, and the next batch gets a new connection. A failed batch is
    not retried: its commands may have run. The connection is held while it is in use, and
    given back to the pool once it has been idle longer than the pool's health-check
    interval (the next batch takes one that was checked): make one pipeline per process and
    share it (the gateway's is shared by its broker, registry and sessions), not one per
    request.

    Commands are independent (no MULTI): use it for single commands and scripts, not for
    reads that must see one moment across several keys.
    """

    def __init__(self, redis: Redis, *, max_batch: int = 512, max_in_flight: int = 1) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False  # a `_send` is due at the end of this loop turn
        self._line: _Line | None = None
        self._opening: asyncio.Future[None] | None = None  # a line being connected
        self._runs: set[asyncio.Future[Any]] = set()  # tasks under way: keep a reference
        # Scripts this pipeline has sent `SCRIPT LOAD` for (forgotten when Redis says it
        # lost them): loading ahead, in the same batch, keeps the runs in order.
        self._loaded: set[str] = set()
        self._fills: list[Callable[[], None]] = []  # `before_next_batch`'s callbacks

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (name and arguments, as for `execute_command`)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        self._schedule()
        return future

    def before_next_batch(self, fill: Callable[[], None]) -> None:
        """Call ``fill`` once, just before the next batch is written: what it queues (with
        `evalsha` or `call`) goes out behind what is queued already, in that batch when
        there is room. For callers that gather work until then, such as the broker's
        publishes (while a batch is in flight, the work of several loop turns gathers; on
        an idle node, that of one)."""
        self._fills.append(fill)
        self._schedule()

    def send(self, *args: Any) -> None:
        """Queue one command whose outcome nobody waits for (a failure is only logged)."""
        self.call(*args).add_done_callback(_log_failure)

    def send_script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue a script run whose outcome nobody waits for (a failure is only logged)."""
        future = self.evalsha(script, keys, args)
        future.add_done_callback(functools.partial(self._script_sent, script, keys, args))

    def evalsha(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Queue a script run now, by SHA (loaded ahead in the same batch the first time);
        its reply as a future. A ``NoScriptError`` (Redis restarted and forgot it) is the
        caller's to retry: `forget` the script, and the next run loads it again first."""
        if script.sha not in self._loaded:
            # Loaded in the same batch, just before: a run that missed it would be retried
            # after commands queued behind it, out of order.
            self._loaded.add(script.sha)
            self.send("SCRIPT", "LOAD", script.script)
        return self.call("EVALSHA", script.sha, len(keys), *keys, *args)

    def forget(self, script: AsyncScript) -> None:
        """Load ``script`` again before its next run (Redis said it does not have it)."""
        self._loaded.discard(script.sha)

    def _script_sent(
        self,
        script: AsyncScript,
        keys: Sequence[Any],
        args: Sequence[Any],
        future: asyncio.Future[Any],
    ) -> None:
        if not future.cancelled() and isinstance(future.exception(), NoScriptError):
            self._loaded.discard(script.sha)  # a restarted Redis forgot it
            retry = asyncio.ensure_future(script(keys=keys, args=args))
            self._runs.add(retry)
            retry.add_done_callback(self._runs.discard)
            retry.add_done_callback(_log_failure)
        else:
            _log_failure(future)

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run a registered Lua script in the next batch (by SHA; loaded on first miss)."""
        try:
            return await self.evalsha(script, keys, args)
        except NoScriptError:  # a restarted Redis forgot it: load it and run it on its own
            self._loaded.discard(script.sha)
            return await script(keys=keys, args=args)

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run a bulk of commands now, in one exchange of its own (not queued with the
        others: use it for writes whose order against them does not matter). Raw replies,
        in order; a command Redis refused gives its error in its place."""
        return await self._exchange(commands) if commands else []

    def _schedule(self) -> None:
        """Send what is queued at the end of this loop turn."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)

    def _send(self) -> None:
        self._scheduled = False
        line = self._line
        if line is not None and line.stale():  # idle for a while: back to the pool
            self._line = None
            self._start(self._give_back(line.retire()))
            line = None
        if line is None:
            if self._opening is None and (self._pending or self._fills):
                self._opening = self._start(self._open())
            return
        if len(line.batches) < self.max_in_flight:
            self._fill()
        while self._pending and len(line.batches) < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            self._pending = self._pending[self.max_batch :]
            self._write(line, batch)

    def _fill(self) -> None:
        fills, self._fills = self._fills, []
        for fill in fills:
            fill()

    def _write(self, line: _Line, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        line.write([args for args, _ in batch], [future for _, future in batch])

    async def _open(self) -> None:
        pool = self.redis.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
            try:
                await conn.check_health()  # a PING if it was idle past the interval
            except BaseException:
                await self._give_back(conn)
                raise
        except BaseException as exc:  # no connection: the commands waiting for one fail
            self._fill()
            self._loaded.clear()  # their `SCRIPT LOAD`s too: a new Redis may lack them
            failed, self._pending = self._pending, []
            for _, future in failed:
                if future.done():
                    continue
                if isinstance(exc, Exception):
                    future.set_exception(exc)
                else:
                    future.cancel()  # the node is stopping
            if not isinstance(exc, Exception):
                raise
            return
        finally:
            self._opening = None
        self._line = _Line(conn, self)
        self._send()

    def _answered(self) -> None:
        """The line finished a batch: a place is free."""
        if (self._pending or self._fills) and not self._scheduled:
            self._send()

    def _lost(self, line: _Line) -> None:
        """The line failed: give its connection back closed; the next batch opens another."""
        if self._line is line:
            self._line = None
        self._loaded.clear()  # Redis may have restarted without the scripts
        self._start(self._give_back(line.conn, close=True))
        if self._pending or self._fills:
            self._schedule()

    async def _give_back(self, conn: AbstractConnection, *, close: bool = False) -> None:
        try:
            if close:
                await conn.disconnect(nowait=True)
        finally:
            await self.redis.connection_pool.release(conn)

    def _start(self, work: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        task = asyncio.ensure_future(work)
        self._runs.add(task)
        task.add_done_callback(self._runs.discard)
        return task

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies, as they come (no response
        callbacks: ``SET`` answers ``b"OK"``, ``ZSCORE`` a float in RESP3).

        redis-py's pipeline costs about 30 µs of CPU per command, a third of it a timeout
        context per reply; this pays one bound for the whole batch, about 8 µs a command.
        A dropped connection is retried as redis-py's pipeline does (the pool's policy).
        """
        pool = self.redis.connection_pool
        conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            packed = _pack(conn, commands)
            bound = conn.socket_timeout

            async def exchange() -> list[Any]:
                replies: list[Any] = []
                try:
                    async with asyncio.timeout(bound):
                        await conn.send_packed_command(packed)
                        for _ in commands:
                            try:  # inf: no timeout context per reply (the batch has one)
                                replies.append(await conn.read_response(timeout=math.inf))
                            except ResponseError as exc:
                                replies.append(exc)
                except TimeoutError as exc:  # as redis-py says it (and retries it)
                    raise RedisTimeoutError(f"no reply from Redis within {bound} s") from exc
                return replies

            async def dropped(_error: Exception) -> None:
                await conn.disconnect()

            replies: list[Any] = await conn.retry.call_with_retry(exchange, dropped)
            return replies
        except BaseException:  # replies may be left unread: never reuse this connection
            await conn.disconnect(nowait=True)
            raise
        finally:
            await pool.release(conn)


class _Line(asyncio.Protocol):
    """The pipeline's connection: batches written back to back as they form, replies parsed
    as they arrive (hiredis, as redis-py parses them) and handed to the callers in order.

    It starts as a connection from the pool, which did the handshake (TLS, AUTH, HELLO,
    SELECT), and takes over its transport: no task, timeout context or coroutine per reply.
    A batch gets `socket_timeout` from the moment it is the oldest unanswered one.
    """

    def __init__(self, conn: AbstractConnection, owner: AutoPipeline) -> None:
        self.conn, self.owner = conn, owner
        self.bound = conn.socket_timeout
        self.reader = hiredis.Reader(
            protocolError=InvalidResponse,
            replyError=_AsyncHiredisParser.parse_error,
            notEnoughData=_INCOMPLETE,  # not False: a RESP3 reply can be `false`
        )
        self.batches: deque[list[asyncio.Future[Any]]] = deque()  # written, not all answered
        self.answered = 0  # replies the oldest batch has had
        self.timer: asyncio.TimerHandle | None = None
        self.failed = False
        self.idle_since = asyncio.get_running_loop().time()
        self.transport: asyncio.Transport = conn._writer.transport  # type: ignore[union-attr,assignment]
        self.streams = self.transport.get_protocol()  # redis-py's: told when it closes
        self.transport.set_protocol(self)

    def write(self, commands: list[tuple[Any, ...]], futures: list[asyncio.Future[Any]]) -> None:
        try:
            packed = _pack(self.conn, commands)
        except Exception as exc:  # e.g. an argument Redis cannot take: this batch fails
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            return
        self.transport.writelines(packed)
        self.batches.append(futures)
        if len(self.batches) == 1:
            self._arm()

    def data_received(self, data: bytes) -> None:
        reader, batches = self.reader, self.batches
        reader.feed(data)
        done = False
        try:
            while (reply := reader.gets()) is not _INCOMPLETE:
                if isinstance(reply, hiredis.PushNotification):
                    continue  # not a reply (server-side notices): redis-py's handlers skipped
                futures = batches[0]
                future = futures[self.answered]
                self.answered += 1
                if self.answered == len(futures):
                    batches.popleft()
                    self.answered = 0
                    done = True
                if future.done():  # the caller gave up (cancelled)
                    continue
                if isinstance(reply, Exception):
                    future.set_exception(reply)
                else:
                    future.set_result(reply)
        except Exception as exc:  # a reply out of protocol, or one nobody asked for
            self._fail(exc)
            return
        if done:
            if self.timer is not None:
                self.timer.cancel()
            if batches:
                self._arm()
            else:
                self.idle_since = asyncio.get_running_loop().time()
            self.owner._answered()

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            self._fail(RedisConnectionError(f"Redis closed the connection: {exc or 'end of file'}"))
        finally:
            self.streams.connection_lost(exc)  # redis-py's `disconnect()` waits for this

    def stale(self) -> bool:
        """Idle (nothing waiting) longer than the pool's health-check interval: whether the
        connection still works is no longer known."""
        interval = self.conn.health_check_interval
        return (
            not self.batches
            and bool(interval)
            and asyncio.get_running_loop().time() - self.idle_since > interval
        )

    def retire(self) -> AbstractConnection:
        """Hand the transport back to redis-py's side of the connection (idle: nothing unread)."""
        self.failed = True  # never written to again
        self.transport.set_protocol(self.streams)
        return self.conn

    def _arm(self) -> None:
        if self.bound is not None:
            self.timer = asyncio.get_running_loop().call_later(self.bound, self._timed_out)

    def _timed_out(self) -> None:
        self._fail(RedisTimeoutError(f"no reply from Redis within {self.bound} s"))

    def _fail(self, exc: Exception) -> None:
        """Every command waiting here fails (the oldest batch's with ``exc``), and the
        connection is closed: replies may be left unread."""
        if self.failed:
            return
        self.failed = True
        if self.timer is not None:
            self.timer.cancel()
        behind = RedisConnectionError(f"a batch ahead on the connection failed: {exc!r}")
        for n, futures in enumerate(self.batches):
            for future in futures:
                if not future.done():
                    future.set_exception(exc if n == 0 else behind)
        self.batches.clear()
        self.transport.close()
        self.owner._lost(self)


_INCOMPLETE = object()  # what `hiredis.Reader.gets` answers while a reply is incomplete


def _pack(conn: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[bytes]:
    # One buffer, one write (hiredis's packer on connections from `create_redis`).
    return [b"".join([part for args in commands for part in conn.pack_command(*args)])]


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.debug("redis: a queued command failed", error=repr(exc))

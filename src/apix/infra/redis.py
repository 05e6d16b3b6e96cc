"""Redis: one asyncio pool per process, with hiredis parsing replies and packing commands."""

from __future__ import annotations

import asyncio
import functools
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import hiredis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.connection import AbstractConnection
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
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
    redis-py; gathered into one pipeline they pay that once. No timer is involved: the first
    command goes out at the end of the current loop turn, so an idle node adds no latency.

    Batches are pipelined on one connection: up to `max_in_flight` are written back to back,
    each as soon as it is formed, without waiting for the replies to the one ahead, and
    their replies are read in the order written (Redis answers a connection's commands in
    order, so the commands run in the order they were queued). Past that, commands wait for
    the next free place and go out together. A batch that fails (a dropped connection, no
    reply in time) fails the batches behind it on the same connection, which is closed; the
    next batch gets a new one. A failed batch is not retried: its commands may have run.

    Commands are independent (no MULTI): use it for single commands and scripts, not for
    reads that must see one moment across several keys.
    """

    def __init__(self, redis: Redis, *, max_batch: int = 512, max_in_flight: int = 2) -> None:
        self.redis = redis
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self._pending: list[tuple[tuple[Any, ...], asyncio.Future[Any]]] = []
        self._scheduled = False  # a `_send` is due at the end of this loop turn
        self._flying = 0  # batches written or being written whose replies are not all read
        self._line: _Line | None = None  # the connection carrying them
        self._runs: set[asyncio.Future[Any]] = set()  # in flight: keep a reference
        # Scripts this pipeline has sent `SCRIPT LOAD` for (forgotten when Redis says it
        # lost them): loading ahead, in the same batch, keeps the runs in order.
        self._loaded: set[str] = set()

    def call(self, *args: Any) -> asyncio.Future[Any]:
        """Queue one command (name and arguments, as for `execute_command`)."""
        future = asyncio.get_running_loop().create_future()
        self._pending.append((args, future))
        if not self._scheduled and self._flying < self.max_in_flight:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._send)
        return future

    def send(self, *args: Any) -> None:
        """Queue one command whose outcome nobody waits for (a failure is only logged)."""
        self.call(*args).add_done_callback(_log_failure)

    def send_script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Queue a script run whose outcome nobody waits for (a failure is only logged)."""
        future = self._evalsha(script, keys, args)
        future.add_done_callback(functools.partial(self._script_sent, script, keys, args))

    def _evalsha(
        self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        if script.sha not in self._loaded:
            # Loaded in the same batch, just before: a run that missed it would be retried
            # after commands queued behind it, out of order.
            self._loaded.add(script.sha)
            self.send("SCRIPT", "LOAD", script.script)
        return self.call("EVALSHA", script.sha, len(keys), *keys, *args)

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
            return await self._evalsha(script, keys, args)
        except NoScriptError:  # a restarted Redis forgot it: load it and run it on its own
            self._loaded.discard(script.sha)
            return await script(keys=keys, args=args)

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Run a bulk of commands now, in one exchange of its own (not queued with the
        others: use it for writes whose order against them does not matter). Raw replies,
        in order; a command Redis refused gives its error in its place."""
        return await self._exchange(commands) if commands else []

    def _send(self) -> None:
        self._scheduled = False
        while self._pending and self._flying < self.max_in_flight:
            batch = self._pending[: self.max_batch]
            self._pending = self._pending[self.max_batch :]
            self._flying += 1
            run = asyncio.ensure_future(self._round_trip(batch))
            self._runs.add(run)
            run.add_done_callback(self._sent)

    def _sent(self, run: asyncio.Task[None]) -> None:
        self._runs.discard(run)
        self._flying -= 1
        if not self._scheduled:
            self._send()

    async def _round_trip(self, batch: list[tuple[tuple[Any, ...], asyncio.Future[Any]]]) -> None:
        try:
            results = await self._carry([args for args, _ in batch])
        except asyncio.CancelledError:  # the node is stopping
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # the round trip failed: so did every command in it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():  # the caller gave up (cancelled)
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _carry(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` on the current line once the batch ahead is written, and read
        their replies once the batch ahead has read its own (raw replies, as `_exchange`)."""
        line = self._line
        if line is None or line.failed:
            line = self._line = _Line(self.redis.connection_pool)
        loop = asyncio.get_running_loop()
        written_ahead, read_ahead = line.written, line.read
        written, read = line.written, line.read = loop.create_future(), loop.create_future()
        line.batches += 1
        conn: AbstractConnection | None = None
        try:
            conn = await asyncio.shield(line.checkout)  # shared: one batch's end is not all's
            _raise_if_failed(await written_ahead)
            await conn.send_packed_command(_pack(conn, commands), check_health=False)
            written.set_result(None)
            _raise_if_failed(await read_ahead)
            bound = conn.socket_timeout
            replies: list[Any] = []
            try:
                async with asyncio.timeout(bound):
                    for _ in commands:
                        try:  # inf: no timeout context per reply (the batch has one)
                            replies.append(await conn.read_response(timeout=math.inf))
                        except ResponseError as exc:
                            replies.append(exc)
            except TimeoutError as exc:  # as redis-py says it
                raise RedisTimeoutError(f"no reply from Redis within {bound} s") from exc
            read.set_result(None)
            return replies
        except BaseException as exc:  # replies may be left unread: never reuse this connection
            line.failed = True
            for step in (written, read):
                if not step.done():
                    step.set_result(exc)
            if conn is not None:
                await conn.disconnect(nowait=True)
            raise
        finally:
            line.batches -= 1
            if line.batches == 0:
                if self._line is line:
                    self._line = None
                await line.close(self.redis.connection_pool)

    async def _exchange(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` in one write and read their replies, as they come (no response
        callbacks: ``SET`` answers ``b"OK"``, ``ZSCORE`` a bytes number).

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


class _Line:
    """A pooled connection carrying batches back to back, checked out for the first and
    released after the last; each batch waits on the one ahead to write, then to read."""

    def __init__(self, pool: Any) -> None:
        self.checkout: asyncio.Future[AbstractConnection] = asyncio.ensure_future(
            pool.get_connection()
        )
        loop = asyncio.get_running_loop()
        # The last batch's steps: None once done, the exception if it failed.
        self.written: asyncio.Future[BaseException | None] = loop.create_future()
        self.read: asyncio.Future[BaseException | None] = loop.create_future()
        self.written.set_result(None)
        self.read.set_result(None)
        self.batches = 0
        self.failed = False

    async def close(self, pool: Any) -> None:
        """Give the connection back (after its last batch), or stop waiting for one."""
        if not self.checkout.done():
            self.checkout.cancel()  # every batch gave up first (the pool takes it back)
        elif not self.checkout.cancelled() and self.checkout.exception() is None:
            await pool.release(self.checkout.result())


def _raise_if_failed(ahead: BaseException | None) -> None:
    if ahead is not None:
        raise RedisConnectionError(f"a batch ahead on the connection failed: {ahead!r}")


def _pack(conn: AbstractConnection, commands: list[tuple[Any, ...]]) -> list[bytes]:
    # One buffer, one write (hiredis's packer on connections from `create_redis`).
    return [b"".join([part for args in commands for part in conn.pack_command(*args)])]


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.debug("redis: a queued command failed", error=repr(exc))

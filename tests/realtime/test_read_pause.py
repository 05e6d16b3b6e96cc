"""Reading pauses while commands pile up: with 32 waiting behind a slow one, the server stops
reading the client's socket (what the client sends stays in the kernel), and reads again once
fewer than 16 wait. Every command is answered, in order."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import struct
import termios
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from tests.conftest import LiveServer
from tests.identity.factories import new_api_key, new_org_admin
from tests.realtime.raw import raw_socket


def _unread(transport: Any) -> int:
    """Bytes the client sent that the server has not read from its socket yet."""
    fd = transport.get_extra_info("socket").fileno()
    return int(struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0])


async def _until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + 5
    while not await condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


class KeyLocks:
    """Locks on the `api_key` table, which a `refresh` with an API key reads (while the
    node keeps no keys: see the test): the refresh under way waits until the lock is
    released. PostgreSQL grants locks in the order they were asked for, so a lock queued
    behind a waiting refresh is granted once that refresh is done, and holds the next
    refresh in turn."""

    def __init__(self, engine: AsyncEngine, probe: AsyncConnection) -> None:
        self.engine = engine
        self.probe = probe  # autocommit: sees the lock table as it is now
        self.held: list[tuple[AsyncConnection, asyncio.Task[Any]]] = []

    async def waiting(self, count: int) -> None:
        """Wait until ``count`` lock requests (commands' or ours) wait on the table."""

        async def now() -> bool:
            waiting = await self.probe.scalar(
                text(
                    "SELECT count(*) FROM pg_locks WHERE NOT granted"
                    " AND relation = 'api_key'::regclass"
                    " AND database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                )
            )
            return int(waiting) == count

        await _until(now, f"never {count} waiting on the api_key table")

    async def take(self) -> asyncio.Task[Any]:
        """Queue one more lock, granted once what was queued before it is done."""
        conn = await self.engine.connect()
        await conn.begin()
        await conn.execute(text("SET LOCAL lock_timeout = '15s'"))
        lock = asyncio.create_task(
            conn.execute(text("LOCK TABLE api_key IN ACCESS EXCLUSIVE MODE"))
        )
        self.held.append((conn, lock))
        return lock

    async def release(self) -> None:
        """Release the oldest lock (once it has been granted)."""
        conn, lock = self.held.pop(0)
        try:
            await asyncio.wait_for(asyncio.shield(lock), 5)
        finally:
            await conn.close()  # rolls back: the lock goes

    async def release_all(self) -> None:
        while self.held:
            with contextlib.suppress(Exception):
                await self.release()


@contextlib.asynccontextmanager
async def key_locks(engine: AsyncEngine) -> AsyncIterator[KeyLocks]:
    async with engine.connect() as conn:
        locks = KeyLocks(engine, await conn.execution_options(isolation_level="AUTOCOMMIT"))
        try:
            yield locks
        finally:
            await locks.release_all()


async def test_reading_pauses_at_32_waiting_and_resumes_below_16(
    client: httpx.AsyncClient, live: LiveServer, owner_engine: AsyncEngine
) -> None:
    admin = await new_org_admin(client)
    key = (await new_api_key(client, admin, role="DEVELOPER"))["key"]
    # A node keeps the API keys it read while its copy of the revocations is current; with
    # that copy stopped, every refresh reads the key from PostgreSQL, where the locks hold it.
    await live.app.state.identity.revocations.stop()
    async with raw_socket(live.ws) as raw, key_locks(owner_engine) as locks:
        hello = await raw.connect(key)
        connection = live.app.state.gateway.connections[hello["connection_id"]]
        transport = connection.socket.transport
        sent: list[str] = []

        async def send(op: str) -> None:
            sent.append(f"c{len(sent)}")
            fields = {"token": key} if op == "refresh" else {}
            await raw.send({"op": op, "id": sent[-1], **fields})

        async def all_read() -> bool:
            return _unread(transport) == 0

        # A first refresh waits for the lock; the commands sent next wait behind it, in
        # the inbox, with two more refreshes among them.
        await asyncio.wait_for(await locks.take(), 5)
        await send("refresh")
        await locks.waiting(1)
        inbox = ["ping"] * 15 + ["refresh", "ping", "refresh"] + ["ping"] * 14
        assert len(inbox) == 32
        for op in inbox[:-1]:
            await send(op)
            await _until(all_read, "the server stopped reading before 32 commands waited")
        assert transport.is_reading()
        await send(inbox[-1])
        await _until(all_read, "the 32nd command was not read")
        assert not transport.is_reading()
        # What the client sends now stays in the server's socket.
        for _ in range(8):
            await send("ping")
        await asyncio.sleep(0.1)
        assert _unread(transport) > 0
        assert not transport.is_reading()

        # The first refresh and 15 pings are answered; the second refresh waits, 16 behind it.
        await locks.take()
        await locks.waiting(2)
        await locks.release()
        replies = [await raw.recv() for _ in range(1 + 15)]
        await locks.waiting(1)
        assert not transport.is_reading()  # 16 waiting is not below 16
        assert _unread(transport) > 0

        # The second refresh and a ping are answered; the third refresh waits, 14 behind it:
        # reading has resumed, and what the client sent meanwhile was read.
        await locks.take()
        await locks.waiting(2)
        await locks.release()
        replies += [await raw.recv() for _ in range(2)]
        await locks.waiting(1)
        await _until(all_read, "reading did not resume once fewer than 16 commands waited")
        assert transport.is_reading()

        await locks.release()
        replies += [await raw.recv() for _ in range(len(sent) - len(replies))]

    assert [r["id"] for r in replies] == sent
    assert all(r["ok"] for r in replies), [r for r in replies if not r["ok"]][:3]

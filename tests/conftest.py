"""Test fixtures: real PostgreSQL and Redis, one database and one Redis db per xdist worker.

Servers come from ``APIX_TEST_DATABASE_URL`` / ``APIX_TEST_REDIS_URL`` when set (CI), else
embedded ones are started for the session. Each worker's database is created fresh from the
migrations; after every test the tables are emptied and the Redis db flushed, so tests
pass in any order.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
import uvicorn
from redis.asyncio import Redis
from sqlalchemy import Table, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from apix.app import create_app
from apix.config import (
    DatabaseSettings,
    Environment,
    LogSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    WorkerSettings,
)
from apix.core.http_protocol import HTTP_PROTOCOL
from apix.infra import migrate
from apix.infra.database import Base, async_url
from apix.infra.embedded import EmbeddedServers
from apix.infra.redis import create_redis
from apix.models import load_all_models
from apix.realtime.transport import WS_PROTOCOL


@dataclass(frozen=True)
class Servers:
    database_url: str  # owner of this worker's database
    redis_url: str  # this worker's Redis db
    data_dir: Path  # signing keys and other node files


def _worker_index(worker_id: str) -> tuple[int, int]:
    """(database number, Redis db) of this xdist worker; ``APIX_TEST_SLOT`` (0 to 6) keeps
    concurrent pytest runs (of at most two workers each) apart."""
    worker = 0 if worker_id == "master" else int(worker_id.removeprefix("gw"))
    slot = int(os.environ.get("APIX_TEST_SLOT", "0"))
    redis_db = 1 + 4 * slot if slot < 4 else 3 + 4 * (slot - 4)  # dbs 1-15, none shared
    return slot * 4 + worker, redis_db + worker


def _redis_db_url(url: str, db: int) -> str:
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return urlunsplit(parts._replace(query=f"db={db}"))
    return urlunsplit(parts._replace(path=f"/{db}"))


async def _recreate_database(server_url: str, name: str) -> str:
    engine = create_async_engine(
        async_url(server_url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    try:
        async with engine.connect() as conn:
            await conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            await conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()
    return make_url(server_url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Iterator[Servers]:
    index, redis_db = _worker_index(worker_id)
    embedded = EmbeddedServers(tmp_path_factory.mktemp("servers"))
    database_url = os.environ.get("APIX_TEST_DATABASE_URL")
    redis_url = os.environ.get("APIX_TEST_REDIS_URL")
    started_db, started_redis = embedded.start(
        need_postgres=not database_url, need_redis=not redis_url
    )
    try:
        server_url = database_url or started_db
        assert server_url is not None
        owner_url = asyncio.run(_recreate_database(server_url, f"apix_test_{index}"))
        # The application role is cluster-wide: workers create it one at a time.
        lock_path = tmp_path_factory.getbasetemp().parent / "apix-migrate.lock"
        with lock_path.open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            migrate.upgrade(owner_url, DatabaseSettings())
        base_redis = redis_url or started_redis
        assert base_redis is not None
        yield Servers(
            owner_url, _redis_db_url(base_redis, redis_db), tmp_path_factory.mktemp("data")
        )
    finally:
        embedded.stop()


def make_settings(servers: Servers, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": Environment.TEST,
        "database_url": servers.database_url,
        "redis_url": servers.redis_url,
        "log": LogSettings(level="INFO", format="json"),
        "node_id": "test-node",
        "data_dir": servers.data_dir,
        # No archiver in the background unless a test asks for one (tests/realtime/test_archive).
        "worker": WorkerSettings(embedded=False),
        # The test process starts many apps: freezing the heap of each would keep its
        # garbage for good (tests/core/test_gc.py covers the setting).
        "server": ServerSettings(gc_freeze=False),
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(servers)


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[object]:
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


@pytest.fixture
async def client(app: object) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://apix.test") as http:
        yield http


@pytest.fixture
async def redis(servers: Servers) -> AsyncIterator[Redis]:
    """A client of the test Redis, for tests of the Redis scripts themselves."""
    client = create_redis(servers.redis_url, RedisSettings())
    yield client
    await client.aclose()


@pytest.fixture
async def owner_engine(servers: Servers) -> AsyncIterator[object]:
    """An engine connected as the schema owner, for test set-up the API cannot do."""
    engine = create_async_engine(async_url(servers.database_url), poolclass=NullPool)
    yield engine
    await engine.dispose()


@pytest.fixture(autouse=True)
async def _clean_state(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    yield
    if "servers" not in request.fixturenames:
        return
    servers: Servers = request.getfixturevalue("servers")
    load_all_models()
    tables = Base.metadata.sorted_tables
    if tables:
        engine = create_async_engine(async_url(servers.database_url), poolclass=NullPool)
        try:
            async with engine.begin() as conn:
                # Fail loudly, not hang, if a test left a transaction holding a lock.
                await conn.execute(text("SET LOCAL lock_timeout = '15s'"))
                await _empty(conn, tables)
        finally:
            await engine.dispose()
    redis = Redis.from_url(servers.redis_url)
    try:
        await redis.flushdb()
    finally:
        await redis.aclose()


async def _empty(conn: AsyncConnection, tables: list[Table]) -> None:
    """Delete every row. A test leaves a few rows in a few tables, and TRUNCATE makes every
    table's files anew (about 4 ms a table, a tenth of a second per test); a superuser's
    DELETE in replica mode sees no trigger, foreign key or row policy. Other roles, whose
    DELETE row policies would filter, TRUNCATE."""
    if await conn.scalar(text("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")):
        await conn.execute(text("SET LOCAL session_replication_role = replica"))
        for table in tables:
            await conn.execute(table.delete())
    else:
        names = ", ".join(f'"{t.name}"' for t in tables)
        await conn.execute(text(f"TRUNCATE {names} CASCADE"))


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture
def runtime(app: object) -> object:
    """The app's identity runtime (keys, hasher, limits) for set-up the API cannot do."""
    return app.state.identity  # type: ignore[attr-defined]


@dataclass
class LiveServer:
    """The app on a real socket (uvicorn, APIX's WebSocket protocol), in the test's loop."""

    app: Any
    port: int

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/apix/ws"


@asynccontextmanager
async def serve_app(
    app: Any, settings: Settings, *, ws: str = WS_PROTOCOL
) -> AsyncIterator[LiveServer]:
    """``app`` on uvicorn, on APIX's WebSocket protocol (or another ``ws`` of uvicorn's)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        lifespan="off",
        http=HTTP_PROTOCOL,
        ws=ws,
        ws_max_size=settings.realtime.max_frame_bytes,
        ws_ping_interval=None,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=2,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield LiveServer(app, sock.getsockname()[1])
    finally:
        server.should_exit = True
        await task
        sock.close()


@asynccontextmanager
async def running_node(
    servers: Servers, **overrides: object
) -> AsyncIterator[tuple[httpx.AsyncClient, LiveServer]]:
    """A node of its own (``overrides`` in its settings), started, on a real socket, with
    an in-process client of its API."""
    settings = make_settings(servers, **overrides)
    app = create_app(settings)
    async with app.router.lifespan_context(app), serve_app(app, settings) as server:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http, server


@pytest.fixture
async def live(app: Any, settings: Settings) -> AsyncIterator[LiveServer]:
    async with serve_app(app, settings) as server:
        yield server

"""PostgreSQL: the runtime engine (application role) and the transaction helper.

Runtime queries run as the application role, which owns nothing and cannot bypass row-level
security; migrations run as the owner (`apix.infra.migrate`). Every unit of work opens its
transaction through `Database.transaction`, which sets the tenant transaction-locally, so a
pooled connection never carries one tenant's setting into another's work, and which releases
side effects (events, jobs) only after the commit.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from sqlalchemy import MetaData, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncConnection,
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

from apix.config import DatabaseSettings
from apix.core.logging import get_logger

log = get_logger(__name__)

TENANT_SETTING = "apix.org_id"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of every table; constraint names follow one convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def async_url(url: str) -> URL:
    """The URL with the asyncpg driver, whatever driver (if any) it named."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql+asyncpg")


def app_url(owner_url: str, settings: DatabaseSettings) -> URL:
    """The application role's URL: explicit, or the owner's URL with the role's credentials."""
    if settings.app_url:
        return async_url(settings.app_url)
    password = settings.app_password.get_secret_value() if settings.app_password else None
    return async_url(owner_url).set(username=settings.app_role, password=password)


AfterCommit = Callable[[], Awaitable[None]]


@dataclass
class UnitOfWork:
    """One transaction: its session, its tenant, and what to do once it has committed."""

    session: AsyncSession
    org_id: uuid.UUID | None
    _after_commit: list[AfterCommit] = field(default_factory=list)

    def after_commit(self, action: AfterCommit) -> None:
        """Run ``action`` after a successful commit; a rollback drops it."""
        self._after_commit.append(action)

    async def _release(self) -> None:
        actions, self._after_commit = self._after_commit, []
        for action in actions:
            try:
                await action()
            except Exception:
                # The transaction is committed; a failed side effect must not turn into an
                # error for the caller. It is logged with the request id for follow-up.
                log.exception("after-commit action failed", action=repr(action))


class Database:
    """The runtime engine and session factory, owned by the app's lifespan."""

    def __init__(self, owner_url: str, settings: DatabaseSettings) -> None:
        self.url = app_url(owner_url, settings)
        server_settings = {"application_name": "apix"}
        if settings.statement_timeout_ms:
            server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        self.engine: AsyncEngine = create_async_engine(
            self.url,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_pre_ping=True,
            connect_args={"server_settings": server_settings},
        )
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False)

    async def dispose(self) -> None:
        await self.engine.dispose()

    @asynccontextmanager
    async def transaction(
        self, org_id: uuid.UUID | None = None, *, user_id: uuid.UUID | None = None
    ) -> AsyncIterator[UnitOfWork]:
        """Open a transaction scoped to ``org_id``; commit on success, roll back on error.

        Services `flush()`, never `commit()`: this is the one place that commits.
        """
        async with self.sessionmaker() as session:
            async with session.begin():
                if org_id is not None:
                    await set_tenant(session, org_id)
                if user_id is not None:
                    await set_user(session, user_id)
                uow = UnitOfWork(session, org_id)
                yield uow
            await uow._release()

    async def ping(self) -> dict[str, Any]:
        """Round trip, server version and migration revision, for status and readiness."""
        started = time.perf_counter()
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
            latency_ms = (time.perf_counter() - started) * 1000
            version = (await conn.execute(text("SHOW server_version"))).scalar_one()
            revision = await current_revision(conn)
        return {"latency_ms": round(latency_ms, 3), "version": version, "revision": revision}


async def set_tenant(session: AsyncSession, org_id: uuid.UUID) -> None:
    """Scope the current transaction to ``org_id`` (row-level security reads it)."""
    await session.execute(
        text("SELECT set_config(:name, :value, true)"),
        {"name": TENANT_SETTING, "value": str(org_id)},
    )


async def set_user(session: AsyncSession, user_id: uuid.UUID) -> None:
    """Let the transaction read the user's own rows across organisations (memberships)."""
    await session.execute(
        text("SELECT set_config('apix.user_id', :value, true)"), {"value": str(user_id)}
    )


async def set_lookup(session: AsyncSession, token_hash: str) -> None:
    """Let the transaction read the one tenant row whose ``token_hash`` this is."""
    await session.execute(
        text("SELECT set_config('apix.lookup_hash', :value, true)"), {"value": token_hash}
    )


async def set_auth_session(session: AsyncSession, session_id: uuid.UUID) -> None:
    """Let the transaction read the one login session being refreshed."""
    await session.execute(
        text("SELECT set_config('apix.session_id', :value, true)"), {"value": str(session_id)}
    )


async def current_revision(conn: Any) -> str | None:
    exists = (await conn.execute(text("SELECT to_regclass('alembic_version')"))).scalar_one()
    if exists is None:
        return None
    row = (await conn.execute(text("SELECT version_num FROM alembic_version"))).first()
    return None if row is None else str(row[0])


async def driver_of(conn: AsyncConnection) -> asyncpg.Connection:
    """The asyncpg connection under ``conn``, in its transaction: for statements that send
    whole columns as arrays (`INSERT … SELECT FROM unnest(…)`), which SQLAlchemy's
    executemany would take apart row by row."""
    driver = (await conn.get_raw_connection()).driver_connection
    assert driver is not None  # noqa: S101 - an open connection
    return driver

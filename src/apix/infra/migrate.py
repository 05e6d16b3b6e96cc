"""Schema migrations (Alembic, packaged in `apix.migrations`) and the application role.

Migrations run as the owner. After upgrading, the application role is created if missing
(when the owner may create roles), stripped of superuser and BYPASSRLS, and granted data
access (never ownership) on every table, so runtime queries stay under row-level security.
These functions are synchronous: call them before the event loop starts, or in a thread.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.pool import NullPool

from apix.config import DatabaseSettings
from apix.core.logging import get_logger
from apix.infra.database import async_url, current_revision

log = get_logger(__name__)

# Tables the application may insert into and read, never change (the audit trail).
APPEND_ONLY_TABLES = ("audit_log",)

# Owner-rights functions the worker calls (partition upkeep of the event archive).
WORKER_FUNCTIONS = (
    "apix_event_ensure_partitions(integer)",
    "apix_event_drop_partitions(integer)",
    "apix_audit_prune(uuid, bigint)",
)

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


_PARTITION = re.compile(r"^apix_event_(p\d{8}|default)$")


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Autogenerate filter: the archive's partitions are made at run time, not modelled."""
    table = obj if type_ == "table" else getattr(obj, "table", None)
    return not (reflected and _PARTITION.match(getattr(table, "name", "") or ""))


def alembic_config(owner_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("file_template", "%%(year)d%%(month).2d%%(day).2d_%%(rev)s_%%(slug)s")
    # Passed as an attribute, not an option: configparser would choke on '%' in passwords.
    cfg.attributes["url"] = async_url(owner_url)
    return cfg


def head_revision() -> str | None:
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def upgrade(owner_url: str, settings: DatabaseSettings, revision: str = "head") -> None:
    command.upgrade(alembic_config(owner_url), revision)
    asyncio.run(_sync_app_role(owner_url, settings))


def downgrade(owner_url: str, revision: str) -> None:
    command.downgrade(alembic_config(owner_url), revision)


def current(owner_url: str) -> str | None:
    return asyncio.run(_current(owner_url))


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down revision, message), newest first."""
    scripts = ScriptDirectory(str(MIGRATIONS_DIR))
    return [
        (rev.revision, _first(rev.down_revision), rev.doc or "") for rev in scripts.walk_revisions()
    ]


def _first(value: str | list[str] | tuple[str, ...] | None) -> str | None:
    if isinstance(value, list | tuple):
        return value[0] if value else None
    return value


async def _current(owner_url: str) -> str | None:
    engine = create_async_engine(async_url(owner_url), poolclass=NullPool)
    try:
        async with engine.connect() as conn:
            return await current_revision(conn)
    finally:
        await engine.dispose()


async def _sync_app_role(owner_url: str, settings: DatabaseSettings) -> None:
    role = settings.app_role
    password = settings.app_password.get_secret_value() if settings.app_password else None
    engine = create_async_engine(async_url(owner_url), poolclass=NullPool)
    try:
        async with engine.begin() as conn:
            exists = (
                await conn.execute(text("SELECT 1 FROM pg_roles WHERE rolname = :r"), {"r": role})
            ).first()
            try:
                async with conn.begin_nested():
                    verb = "ALTER" if exists else "CREATE"
                    ddl = (
                        await conn.execute(
                            text(
                                "SELECT format('%s ROLE %I LOGIN NOSUPERUSER NOBYPASSRLS "
                                "NOCREATEDB NOCREATEROLE', CAST(:verb AS text), CAST(:r AS text))"
                                " || CASE WHEN CAST(:p AS text) IS NULL THEN ''"
                                " ELSE format(' PASSWORD %L', CAST(:p AS text)) END"
                            ),
                            {"verb": verb, "r": role, "p": password},
                        )
                    ).scalar_one()
                    await conn.execute(text(ddl))
            except DBAPIError:
                if not exists:
                    raise
                # The owner may not manage roles (managed PostgreSQL): the operator made the
                # role; the role check in `apix.infra.database` still refuses a privileged one.
                log.warning("cannot alter the application role; leaving it as is", role=role)
            quoted = (await conn.execute(text("SELECT quote_ident(:r)"), {"r": role})).scalar_one()
            for statement in (
                f"GRANT CONNECT ON DATABASE {await _quoted_database(conn)} TO {quoted}",
                f"GRANT USAGE ON SCHEMA public TO {quoted}",
                f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {quoted}",
                f"GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {quoted}",
                f"REVOKE INSERT, UPDATE, DELETE ON alembic_version FROM {quoted}",
            ):
                await conn.execute(text(statement))
            # Partitions are reached through their parent, under its row-level security.
            partitions = await conn.execute(
                text(
                    "SELECT quote_ident(relname) FROM pg_class WHERE relispartition "
                    "AND relkind = 'r' AND relnamespace = 'public'::regnamespace"
                )
            )
            for (partition,) in partitions:
                await conn.execute(text(f"REVOKE ALL ON {partition} FROM {quoted}"))
            for function in WORKER_FUNCTIONS:
                if (
                    await conn.execute(text("SELECT to_regprocedure(:f)"), {"f": function})
                ).scalar():
                    await conn.execute(text(f"GRANT EXECUTE ON FUNCTION {function} TO {quoted}"))
            for table in APPEND_ONLY_TABLES:
                if (await conn.execute(text("SELECT to_regclass(:t)"), {"t": table})).scalar():
                    await conn.execute(text(f"REVOKE UPDATE, DELETE ON {table} FROM {quoted}"))
    finally:
        await engine.dispose()


async def _quoted_database(conn: AsyncConnection) -> str:
    result = await conn.execute(text("SELECT quote_ident(current_database())"))
    return str(result.scalar_one())

"""The `apix` command: serve, migrate, config, version."""

from __future__ import annotations

import json
import os
import signal
from types import ModuleType
from typing import Annotated, Any

import typer
import uvicorn
from pydantic import BaseModel, SecretStr, TypeAdapter

from apix import __version__
from apix.audit.cli import audit_cli
from apix.config import Settings, get_settings
from apix.core.http_protocol import HTTP_PROTOCOL
from apix.core.logging import configure_logging, get_logger
from apix.infra import migrate as migrations
from apix.infra.embedded import EmbeddedServers
from apix.realtime.transport import WS_PROTOCOL

log = get_logger("apix.cli")

cli = typer.Typer(
    name="apix",
    help="APIX: a multi-tenant, real-time-first backend for AI-agent products.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
migrate_cli = typer.Typer(
    help="Apply or inspect schema migrations (runs as the database owner).",
    no_args_is_help=True,
)
cli.add_typer(migrate_cli, name="migrate")


@cli.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Bind address [APIX_SERVER__HOST].")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port [APIX_SERVER__PORT].")] = None,
    workers: Annotated[
        int | None, typer.Option(help="Node processes [APIX_SERVER__WORKERS].")
    ] = None,
    reload: Annotated[bool, typer.Option(help="Restart on code changes (development).")] = False,
) -> None:
    """Serve the API and the real-time gateway, on embedded servers unless configured."""
    settings = _settings()
    configure_logging(settings.log)
    embedded = EmbeddedServers(settings.data_dir)
    # SIGTERM ends the node like Ctrl-C: uvicorn drains requests, then we stop what we started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        database_url = _ensure_servers(settings, embedded)
        if settings.database.migrate_on_start:
            migrations.upgrade(database_url, settings.database)
        server = settings.server
        bind_host, bind_port = host or server.host, port if port is not None else server.port
        typer.echo(f"APIX {__version__} on http://{bind_host}:{bind_port}")
        typer.echo(f"  API docs: http://{bind_host}:{bind_port}/api/docs")
        uvicorn.run(
            "apix.app:create_app",
            factory=True,
            host=bind_host,
            port=bind_port,
            workers=None if reload else (workers or server.workers),
            reload=reload,
            timeout_graceful_shutdown=int(max(1, server.graceful_timeout_s)),
            log_config=None,
            access_log=False,
            server_header=False,
            proxy_headers=True,
            http=HTTP_PROTOCOL,
            ws=WS_PROTOCOL,
            ws_max_size=settings.realtime.max_frame_bytes,
            ws_ping_interval=None,  # the protocol's own ping/pong measures and enforces liveness
            ws_per_message_deflate=True,
        )
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop()
    typer.echo("APIX stopped")


@cli.command()
def worker(
    consumer: Annotated[
        str | None, typer.Option(help="Name in the consumer groups (default: node:worker:pid).")
    ] = None,
) -> None:
    """Run the background workers (the event archiver) until SIGTERM or Ctrl-C."""
    import asyncio

    uvloop: ModuleType | None
    try:
        import uvloop
    except ImportError:  # uvicorn[standard] leaves it out where it does not build
        uvloop = None

    from apix.worker import run_worker

    settings = _settings()
    configure_logging(settings.log)
    embedded = EmbeddedServers(settings.data_dir)
    try:
        database_url = _ensure_servers(settings, embedded)
        if settings.database.migrate_on_start:
            migrations.upgrade(database_url, settings.database)
        main = run_worker(get_settings(), consumer=consumer)
        if uvloop is None or not hasattr(uvloop, "run"):  # uvloop.run: 0.18 and later
            asyncio.run(main)
        else:  # as `apix serve` runs (uvicorn's default loop where uvloop is installed)
            uvloop.run(main)
    except KeyboardInterrupt:
        pass
    finally:
        embedded.stop()
    typer.echo("APIX worker stopped")


def _ensure_servers(settings: Settings, embedded: EmbeddedServers) -> str:
    """The servers to use: configured ones, or embedded ones started now.

    The URLs go into the environment so that every node process `uvicorn` starts uses them.
    """
    need_postgres, need_redis = settings.embedded_database, settings.embedded_redis
    if need_postgres or need_redis:
        typer.echo(f"Embedded servers keep their data in {settings.data_dir.resolve()}")
    started_db, started_redis = embedded.start(need_postgres=need_postgres, need_redis=need_redis)
    database_url = settings.database_url or started_db
    redis_url = settings.redis_url or started_redis
    if database_url is None or redis_url is None:  # pragma: no cover - start() gives both
        raise RuntimeError("embedded servers did not report their URLs")
    from apix.app import EMBEDDED_ENV

    os.environ["APIX_DATABASE_URL"] = database_url
    os.environ["APIX_REDIS_URL"] = redis_url
    os.environ[EMBEDDED_ENV] = ",".join(
        name for name, wanted in (("postgres", need_postgres), ("redis", need_redis)) if wanted
    )
    get_settings.cache_clear()
    return database_url


@migrate_cli.command("upgrade")
def migrate_upgrade(
    revision: Annotated[str, typer.Argument(help="Target revision.")] = "head",
) -> None:
    """Upgrade the schema to REVISION (default: the newest)."""
    with _database_url() as url:
        migrations.upgrade(url, _settings().database, revision)
        typer.echo(f"database at {migrations.current(url)}")


@migrate_cli.command("downgrade")
def migrate_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. -1 or base.")],
) -> None:
    """Downgrade the schema to REVISION."""
    with _database_url() as url:
        migrations.downgrade(url, revision)
        typer.echo(f"database at {migrations.current(url)}")


@migrate_cli.command("current")
def migrate_current() -> None:
    """Print the database's revision and the newest one."""
    with _database_url() as url:
        typer.echo(f"current: {migrations.current(url)}")
        typer.echo(f"head: {migrations.head_revision()}")


@migrate_cli.command("history")
def migrate_history() -> None:
    """List the revisions, newest first."""
    for revision, down, message in migrations.history():
        typer.echo(f"{down or '<base>'} -> {revision}: {message.splitlines()[0]}")


class _DatabaseUrl:
    """The owner URL: configured, or from an embedded server started for the command."""

    def __init__(self) -> None:
        self.embedded: EmbeddedServers | None = None

    def __enter__(self) -> str:
        settings = _settings()
        configure_logging(settings.log)
        if settings.database_url:
            return settings.database_url
        self.embedded = EmbeddedServers(settings.data_dir)
        url, _ = self.embedded.start(need_postgres=True, need_redis=False)
        assert url is not None  # noqa: S101
        return url

    def __exit__(self, *_exc: object) -> None:
        if self.embedded is not None:
            self.embedded.stop()


def _database_url() -> _DatabaseUrl:
    return _DatabaseUrl()


admin_cli = typer.Typer(help="Platform administration.", no_args_is_help=True)
keys_cli = typer.Typer(help="Token signing keys (RS256).", no_args_is_help=True)
cli.add_typer(admin_cli, name="admin")
cli.add_typer(keys_cli, name="keys")
cli.add_typer(audit_cli, name="audit")


@admin_cli.command("create-superadmin")
def create_superadmin(
    email: Annotated[str, typer.Option(help="The operator's email (login).")],
    name: Annotated[str, typer.Option(help="Display name.")] = "Platform admin",
    password: Annotated[
        str,
        typer.Option(
            prompt=True,
            hide_input=True,
            confirmation_prompt=True,
            envvar="APIX_ADMIN_PASSWORD",
            help="Password (prompted when not given; or APIX_ADMIN_PASSWORD).",
        ),
    ] = "",
) -> None:
    """Create a SUPER_ADMIN (platform operator), or promote an existing account."""
    import asyncio

    from apix.identity.passwords import Passwords
    from apix.identity.schemas import Password
    from apix.identity.service import create_super_admin
    from apix.infra.database import Database

    try:
        TypeAdapter(Password).validate_python(password)
    except ValueError as exc:
        typer.echo("the password must be 8 to 128 characters", err=True)
        raise typer.Exit(2) from exc
    settings = _settings()

    async def run(url: str) -> str:
        database = Database(url, settings.database)
        try:
            user_id = await create_super_admin(
                database, Passwords(settings.auth), email=email, password=password, name=name
            )
        finally:
            await database.dispose()
        return str(user_id)

    with _database_url() as url:
        migrations.upgrade(url, settings.database)
        typer.echo(f"SUPER_ADMIN {email} ({asyncio.run(run(url))})")


@keys_cli.command("rotate")
def rotate_keys(
    prune: Annotated[bool, typer.Option(help="Delete keys whose tokens have all expired.")] = True,
) -> None:
    """Make a new signing key; new tokens use it, tokens of older keys stay valid until expiry."""
    import time

    from apix.identity import keys

    settings = _settings()
    key = keys.generate(settings.keys_dir)
    typer.echo(f"new signing key {key.kid} in {settings.keys_dir}")
    if prune:
        cutoff = time.time() - settings.auth.access_ttl_s - 60
        for kid in keys.prune(settings.keys_dir, keep_after=cutoff):
            typer.echo(f"removed expired key {kid}")


@keys_cli.command("list")
def list_keys() -> None:
    """List the signing keys, newest (the one that signs) first."""
    from apix.identity.keys import KeyRing

    ring = KeyRing(_settings().keys_dir)
    ring.load(create_if_empty=False)
    for jwk in sorted(ring.jwks()["keys"], key=lambda k: k["kid"], reverse=True):
        typer.echo(jwk["kid"] + ("  (signing)" if jwk["kid"] == ring.current.kid else ""))


@cli.command("config")
def show_config(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Print the effective settings, secrets masked."""
    values = _masked(_settings())
    if as_json:
        typer.echo(json.dumps(values, indent=2, default=str))
        return
    for name, value in _flatten(values):
        typer.echo(f"{name}={value}")


@cli.command()
def version() -> None:
    """Print the APIX version."""
    typer.echo(__version__)


def _settings() -> Settings:
    try:
        return get_settings()
    except ValueError as exc:
        typer.echo(f"invalid configuration: {exc}", err=True)
        raise typer.Exit(2) from exc


def _masked(model: BaseModel) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            values[name] = _masked(value)
        elif isinstance(value, SecretStr):
            values[name] = "**********" if value.get_secret_value() else ""
        elif isinstance(value, str) and "://" in value:
            values[name] = _mask_url(value)
        else:
            values[name] = value.value if hasattr(value, "value") else value
    return values


def _mask_url(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@", 1)[-1] if "@" in url else url


def _flatten(values: dict[str, Any], prefix: str = "APIX_") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for name, value in values.items():
        key = f"{prefix}{name.upper()}"
        if isinstance(value, dict):
            out.extend(_flatten(value, f"{key}__"))
        else:
            out.append((key, json.dumps(value) if isinstance(value, list) else value))
    return out


def main() -> None:
    cli()

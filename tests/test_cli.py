"""The `apix` command, run as a user runs it: a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from apix import __version__
from apix.infra.migrate import head_revision
from tests.conftest import Servers

APIX = [sys.executable, "-m", "apix"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    return subprocess.run(
        [*APIX, *args], env={**base, **(env or {})}, capture_output=True, text=True, timeout=120
    )


def test_version() -> None:
    result = run("version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == __version__


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["serve"],
        ["migrate"],
        ["migrate", "upgrade"],
        ["migrate", "downgrade"],
        ["migrate", "current"],
        ["migrate", "history"],
        ["config"],
        ["version"],
    ],
)
def test_every_command_has_help(command: list[str]) -> None:
    result = run(*command, "--help")
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


def test_serve_help_lists_its_options() -> None:
    out = run("serve", "--help").stdout
    for option in ("--host", "--port", "--workers", "--reload"):
        assert option in out


def test_config_prints_effective_settings_with_secrets_masked() -> None:
    env = {
        "APIX_SECRET_KEY": "topsecret-value-0123456789abcdef",
        "APIX_DATABASE_URL": "postgresql://owner:hunter2@db.internal:5432/apix",
        "APIX_SERVER__PORT": "9001",
    }
    result = run("config", env=env)
    assert result.returncode == 0, result.stderr
    assert "topsecret" not in result.stdout
    assert "hunter2" not in result.stdout
    assert "APIX_SERVER__PORT=9001" in result.stdout
    assert "APIX_SECRET_KEY=**********" in result.stdout
    assert "db.internal" in result.stdout
    as_json = json.loads(run("config", "--json", env=env).stdout)
    assert as_json["server"]["port"] == 9001
    assert as_json["secret_key"] == "**********"


def test_config_refuses_placeholder_secret_in_production() -> None:
    result = run("config", env={"APIX_ENV": "production"})
    assert result.returncode == 2
    assert "APIX_SECRET_KEY" in result.stderr


def test_migrate_current_and_history(servers: Servers) -> None:
    current = run("migrate", "current", env={"APIX_DATABASE_URL": servers.database_url})
    assert current.returncode == 0, current.stderr
    assert f"current: {head_revision()}" in current.stdout
    assert f"head: {head_revision()}" in current.stdout
    history = run("migrate", "history")
    assert history.returncode == 0, history.stderr
    assert "<base> -> 0001: baseline" in history.stdout


async def test_migrate_upgrade_and_downgrade_on_a_fresh_database(servers: Servers) -> None:
    import uuid

    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.ext.asyncio import create_async_engine
    from sqlalchemy.pool import NullPool

    from apix.infra.database import async_url

    name = f"apix_cli_{uuid.uuid4().hex[:8]}"
    admin = create_async_engine(
        async_url(servers.database_url), poolclass=NullPool, isolation_level="AUTOCOMMIT"
    )
    async with admin.connect() as conn:
        await conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(servers.database_url).set(database=name).render_as_string(hide_password=False)
    env = {"APIX_DATABASE_URL": url}
    try:
        up = run("migrate", "upgrade", env=env)
        assert up.returncode == 0, up.stderr
        assert f"database at {head_revision()}" in up.stdout
        down = run("migrate", "downgrade", "base", env=env)
        assert down.returncode == 0, down.stderr
        assert "database at None" in down.stdout
        again = run("migrate", "upgrade", env=env)
        assert f"database at {head_revision()}" in again.stdout
    finally:
        async with admin.connect() as conn:
            await conn.execute(text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        await admin.dispose()

"""`apix audit verify|prune`, run as an operator runs them: a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.audit.helpers import chain_rows, tamper
from tests.conftest import Servers
from tests.identity.factories import new_org_admin


def apix(servers: Servers, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    return subprocess.run(
        [sys.executable, "-m", "apix", "audit", *args],
        env={**base, "APIX_DATABASE_URL": servers.database_url, "APIX_LOG__LEVEL": "WARNING"},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_verify_checks_every_chain_and_names_the_broken_row(
    servers: Servers, client: httpx.AsyncClient, owner_engine: AsyncEngine
) -> None:
    a, b = await new_org_admin(client), await new_org_admin(client)
    result = apix(servers, "verify")
    assert result.returncode == 0, result.stderr
    assert "platform: ok" in result.stdout
    assert f"org {a.org_id}: ok, 2 rows (seq 1..2)" in result.stdout
    assert f"org {b.org_id}: ok" in result.stdout

    org = uuid.UUID(b.org_id)
    first = (await chain_rows(owner_engine, org))[0]
    await tamper(owner_engine, org, first["id"], "ip", "192.0.2.99")
    result = apix(servers, "verify")
    assert result.returncode == 1
    assert f"org {a.org_id}: ok" in result.stdout
    assert f"org {b.org_id}: BROKEN at seq 1 (id {first['id']})" in result.stdout

    one = apix(servers, "verify", "--org", b.org_id, "--json")
    assert one.returncode == 1
    report = json.loads(one.stdout)
    assert report["broken"]["seq"] == 1
    assert report["broken"]["id"] == str(first["id"])


def test_verify_of_an_unknown_organisation(servers: Servers) -> None:
    result = apix(servers, "verify", "--org", str(uuid.uuid4()))
    assert result.returncode == 2
    assert "no organization" in result.stderr


async def test_prune_keeps_rows_within_the_retention(
    servers: Servers, client: httpx.AsyncClient
) -> None:
    admin = await new_org_admin(client)
    result = apix(servers, "prune", "--org", admin.org_id)
    assert result.returncode == 0, result.stderr
    assert f"org {admin.org_id}: nothing older than 365 days" in result.stdout
    everything = apix(servers, "prune", "--default-days", "30")
    assert everything.returncode == 0, everything.stderr
    assert "platform: nothing older than 30 days" in everything.stdout


def test_prune_refuses_a_bad_retention(servers: Servers) -> None:
    result = apix(servers, "prune", "--default-days", "0")
    assert result.returncode == 2

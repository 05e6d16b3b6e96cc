"""`apix admin create-superadmin` and `apix keys rotate|list`, run as subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import jwt

from apix.app import create_app
from apix.identity.keys import KeyRing
from tests.conftest import Servers, make_settings


def apix(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("APIX_")}
    return subprocess.run(
        [sys.executable, "-m", "apix", *args],
        env={**base, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_create_superadmin_then_log_in_as_super_admin(
    servers: Servers, client: httpx.AsyncClient
) -> None:
    env = {"APIX_DATABASE_URL": servers.database_url, "APIX_ADMIN_PASSWORD": "root password 1"}
    result = apix("admin", "create-superadmin", "--email", "root@example.com", env=env)
    assert result.returncode == 0, result.stderr
    assert "SUPER_ADMIN root@example.com" in result.stdout
    login = await client.post(
        "/api/v1/auth/login", json={"email": "root@example.com", "password": "root password 1"}
    )
    assert login.status_code == 200, login.text
    assert login.json()["role"] == "SUPER_ADMIN"
    orgs = await client.get(
        "/api/v1/admin/organizations",
        headers={"Authorization": f"Bearer {login.json()['access_token']}"},
    )
    assert orgs.status_code == 200


def test_create_superadmin_refuses_a_short_password(servers: Servers) -> None:
    env = {"APIX_DATABASE_URL": servers.database_url, "APIX_ADMIN_PASSWORD": "short"}
    result = apix("admin", "create-superadmin", "--email", "r@example.com", env=env)
    assert result.returncode == 2
    assert "8 to 128" in result.stderr


async def test_keys_rotate_new_tokens_use_the_new_key_old_tokens_stay_valid(
    servers: Servers, tmp_path: Path
) -> None:
    keys_dir = tmp_path / "keys"
    settings = make_settings(servers, auth={"keys_dir": keys_dir})
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            await http.post(
                "/api/v1/auth/register",
                json={
                    "email": "k@example.com",
                    "password": "a long password",
                    "name": "K",
                    "organization_name": "K",
                    "organization_slug": "k-org",
                },
            )
            body = {"email": "k@example.com", "password": "a long password"}
            before = (await http.post("/api/v1/auth/login", json=body)).json()["access_token"]
            old_kid = jwt.get_unverified_header(before)["kid"]

            rotated = apix("keys", "rotate", env={"APIX_AUTH__KEYS_DIR": str(keys_dir)})
            assert rotated.returncode == 0, rotated.stderr
            listing = apix("keys", "list", env={"APIX_AUTH__KEYS_DIR": str(keys_dir)}).stdout
            new_kid = KeyRing(keys_dir)
            new_kid.load(create_if_empty=False)
            assert new_kid.current.kid != old_kid
            assert f"{new_kid.current.kid}  (signing)" in listing
            assert old_kid in listing

            # The running node learns the new key from the folder: tokens by both verify.
            app.state.identity.keyring.load(create_if_empty=False)
            after = (await http.post("/api/v1/auth/login", json=body)).json()["access_token"]
            assert jwt.get_unverified_header(after)["kid"] == new_kid.current.kid
            for token in (before, after):
                profile = await http.get(
                    "/api/v1/auth/profile", headers={"Authorization": f"Bearer {token}"}
                )
                assert profile.status_code == 200
            jwks = (await http.get("/.well-known/jwks.json")).json()
            assert {k["kid"] for k in jwks["keys"]} == {old_kid, new_kid.current.kid}

"""Brute-force limits on login: per account and per client IP, with Retry-After, audited.

`runtime.settings.auth.login_failures_per_account` failed logins in a minute are allowed for
one account; the next attempt gets 429 whatever the password, from any address.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.app import create_app
from apix.config import AuthSettings
from apix.identity.runtime import IdentityRuntime
from tests.conftest import Servers, make_settings
from tests.identity.factories import PASSWORD, new_org_admin

LOGIN = "/api/v1/auth/login"
WRONG = "not the password at all"


def _client_from(app: Any, ip: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://apix.test")


def _assert_rate_limited(response: httpx.Response) -> int:
    assert response.status_code == 429, response.text
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 61
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == "rate_limited"
    assert error["message"]
    assert error["details"] == {"retry_after_s": retry_after}
    return retry_after


async def test_eleventh_failed_login_in_a_minute_is_rate_limited(
    client: httpx.AsyncClient, app: Any, runtime: IdentityRuntime
) -> None:
    allowed = runtime.settings.auth.login_failures_per_account
    assert allowed == 10
    admin = await new_org_admin(client)
    other = await new_org_admin(client)

    for attempt in range(allowed):
        # The limit is per account, not per spelling of its address.
        email = admin.email.upper() if attempt % 2 else admin.email
        response = await client.post(LOGIN, json={"email": email, "password": WRONG})
        assert response.status_code == 401, (attempt, response.text)
        assert response.json()["error"]["code"] == "invalid_credentials"

    _assert_rate_limited(await client.post(LOGIN, json={"email": admin.email, "password": WRONG}))
    # While blocked, the right password is refused too, from this and from any other address.
    right = {"email": admin.email, "password": PASSWORD}
    _assert_rate_limited(await client.post(LOGIN, json=right))
    async with _client_from(app, "203.0.113.77") as elsewhere:
        _assert_rate_limited(await elsewhere.post(LOGIN, json=right))
        _assert_rate_limited(
            await elsewhere.post(LOGIN, json={**right, "email": admin.email.upper()})
        )
    # Other accounts are not affected by this account's block.
    response = await client.post(LOGIN, json={"email": other.email, "password": PASSWORD})
    assert response.status_code == 200, response.text


async def test_the_limit_counts_failures_not_successes(
    client: httpx.AsyncClient, runtime: IdentityRuntime
) -> None:
    admin = await new_org_admin(client)
    right = {"email": admin.email, "password": PASSWORD}
    for _ in range(runtime.settings.auth.login_failures_per_account - 1):
        response = await client.post(LOGIN, json={"email": admin.email, "password": WRONG})
        assert response.status_code == 401
    for _ in range(3):
        assert (await client.post(LOGIN, json=right)).status_code == 200
    assert (await client.post(LOGIN, json={**right, "password": WRONG})).status_code == 401
    _assert_rate_limited(await client.post(LOGIN, json=right))


@pytest.fixture
async def strict_ip_app(servers: Servers) -> AsyncIterator[Any]:
    """The app with a small per-IP limit, so the IP rule can be reached in a few attempts."""
    settings = make_settings(
        servers, auth=AuthSettings(login_failures_per_ip=5, login_failures_per_account=100)
    )
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        yield application


async def test_failures_from_one_ip_across_accounts_are_rate_limited(strict_ip_app: Any) -> None:
    async with (
        _client_from(strict_ip_app, "198.51.100.7") as attacker,
        _client_from(strict_ip_app, "198.51.100.8") as neighbour,
    ):
        victim = await new_org_admin(neighbour)
        for index in range(5):
            sprayed = {"email": f"spray-{index}-{uuid.uuid4().hex[:6]}@example.com"}
            response = await attacker.post(LOGIN, json={**sprayed, "password": WRONG})
            assert response.status_code == 401, response.text
        right = {"email": victim.email, "password": PASSWORD}
        _assert_rate_limited(await attacker.post(LOGIN, json=right))
        # Only that address is blocked: the account itself has no failures.
        assert (await neighbour.post(LOGIN, json=right)).status_code == 200


async def test_unknown_email_and_wrong_password_are_indistinguishable(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    wrong_password = await client.post(LOGIN, json={"email": admin.email, "password": WRONG})
    unknown_email = await client.post(
        LOGIN, json={"email": f"nobody-{uuid.uuid4().hex}@example.com", "password": WRONG}
    )
    assert wrong_password.status_code == unknown_email.status_code == 401
    assert wrong_password.json() == unknown_email.json()
    assert wrong_password.content == unknown_email.content
    assert wrong_password.json()["error"]["code"] == "invalid_credentials"

    def shape(response: httpx.Response) -> dict[str, str]:
        varying = {"x-request-id", "date"}
        return {k: v for k, v in response.headers.items() if k.lower() not in varying}

    assert shape(wrong_password) == shape(unknown_email)


async def test_failed_logins_are_audited(
    client: httpx.AsyncClient, owner_engine: AsyncEngine
) -> None:
    admin = await new_org_admin(client)
    for _ in range(3):
        response = await client.post(LOGIN, json={"email": admin.email, "password": WRONG})
        assert response.status_code == 401
    stranger = f"stranger-{uuid.uuid4().hex}@example.com"
    response = await client.post(LOGIN, json={"email": stranger, "password": WRONG})
    assert response.status_code == 401

    async with owner_engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT actor_user_id, target_id, outcome, ip, details FROM audit_log "
                    "WHERE action = 'auth.login' ORDER BY created_at"
                )
            )
        ).all()
    failures = [row for row in rows if row.outcome == "failure"]
    successes = [row for row in rows if row.outcome == "success"]
    assert len(failures) == 4, rows
    assert len(successes) == 1  # the factory's login
    known, unknown = failures[:3], failures[3]
    for row in known:
        assert str(row.actor_user_id) == admin.user_id
        assert row.target_id == admin.user_id
        assert row.details == {"reason": "invalid_credentials"}
        assert row.ip == "127.0.0.1"
    assert unknown.actor_user_id is None
    assert unknown.details == {"reason": "invalid_credentials"}
    # Passwords never reach the audit trail.
    assert all(WRONG not in str(row.details) for row in rows)

"""Factories for identity tests: accounts, organisations and tokens made through the API."""

from __future__ import annotations

import itertools
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from apix.identity.runtime import IdentityRuntime
from apix.identity.service import create_super_admin

PASSWORD = "correct horse battery staple"
_counter = itertools.count()


def unique(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}-{uuid.uuid4().hex[:6]}"


@dataclass
class Account:
    """A user logged in to one organisation."""

    email: str
    user_id: str
    org_id: str
    org_slug: str
    role: str
    access_token: str
    refresh_token: str
    password: str = PASSWORD
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **extra: Any
) -> dict[str, Any]:
    response = await client.post(
        "/api/v1/auth/login", json={"email": email, "password": password, **extra}
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def _account(email: str, tokens: dict[str, Any]) -> Account:
    return Account(
        email=email,
        user_id=tokens["user"]["id"],
        org_id=tokens["organization"]["id"],
        org_slug=tokens["organization"]["slug"],
        role=tokens["role"],
        access_token=tokens["access_token"],
        refresh_token=tokens["refresh_token"],
    )


async def new_org_admin(client: httpx.AsyncClient, slug: str | None = None) -> Account:
    """Register a user with a new organisation (as its ORG_ADMIN) and log in."""
    slug = slug or unique("org")
    email = f"{unique('admin')}@example.com"
    response = await client.post(
        "/api/v1/auth/register",
        json={
            "email": email,
            "password": PASSWORD,
            "name": "Admin",
            "organization_name": f"Org {slug}",
            "organization_slug": slug,
        },
    )
    assert response.status_code == 201, response.text
    return _account(email, await login(client, email))


async def new_member(client: httpx.AsyncClient, admin: Account, role: str) -> Account:
    """Invite a new user into ``admin``'s organisation with ``role``, register, log in."""
    email = f"{unique(role.lower())}@example.com"
    invite = await client.post(
        "/api/v1/admin/invitations", headers=admin.headers, json={"email": email, "role": role}
    )
    assert invite.status_code == 201, invite.text
    response = await client.post(
        "/api/v1/auth/register",
        json={
            "email": email,
            "password": PASSWORD,
            "name": role.title(),
            "invitation_token": invite.json()["token"],
        },
    )
    assert response.status_code == 201, response.text
    return _account(email, await login(client, email, organization_slug=admin.org_slug))


async def new_api_key(client: httpx.AsyncClient, admin: Account, **body: Any) -> dict[str, Any]:
    body.setdefault("name", unique("key"))
    response = await client.post("/api/v1/admin/api-keys", headers=admin.headers, json=body)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def new_super_admin(client: httpx.AsyncClient, runtime: IdentityRuntime) -> dict[str, Any]:
    """A platform operator (made as the CLI makes one), logged in."""
    email = f"{unique('root')}@example.com"
    await create_super_admin(
        runtime.database, runtime.passwords, email=email, password=PASSWORD, name="Root"
    )
    return await login(client, email)

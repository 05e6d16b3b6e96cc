"""Tenant isolation through the HTTP API.

Two organisations, A and B, each with an admin, a member, a pending invitation, API keys and
login sessions. A's credentials (an ORG_ADMIN's token and an ORG_ADMIN API key) must not
read, change or even detect B's objects: every id-taking endpoint answers B's ids exactly as
it answers ids that do not exist, B's state is unchanged afterwards, every list shows only
A's rows, and A's writes land in A only.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from apix.identity.runtime import IdentityRuntime
from tests.identity.factories import Account, new_api_key, new_member, new_org_admin, unique

ADMIN = "/api/v1/admin"


@dataclass
class Tenant:
    """One organisation and everything it owns, made through the API."""

    admin: Account  # the organisation's only ORG_ADMIN
    member: Account  # a DEVELOPER
    invitation: dict[str, Any]  # pending
    api_key: dict[str, Any]  # a VIEWER key: a target
    admin_key: dict[str, Any]  # an ORG_ADMIN key: a caller
    admin_session: str
    member_session: str

    @property
    def key_headers(self) -> dict[str, str]:
        return {"X-API-Key": self.admin_key["key"]}

    @property
    def org_id(self) -> str:
        return self.admin.org_id

    def markers(self) -> set[str]:
        """Strings that identify this tenant's rows; none may appear in another's answers."""
        return {
            self.admin.org_id,
            self.admin.org_slug,
            self.admin.user_id,
            self.admin.email,
            self.member.user_id,
            self.member.email,
            self.invitation["id"],
            self.invitation["email"],
            self.api_key["id"],
            self.api_key["prefix"],
            self.api_key["name"],
            self.admin_key["id"],
            self.admin_key["prefix"],
            self.admin_key["name"],
            self.admin_session,
            self.member_session,
        }


async def _current_session(client: httpx.AsyncClient, account: Account) -> str:
    response = await client.get(f"{ADMIN}/sessions", headers=account.headers)
    assert response.status_code == 200, response.text
    current = [s["id"] for s in response.json() if s["current"]]
    assert len(current) == 1, response.text
    return current[0]


async def _invite(client: httpx.AsyncClient, headers: dict[str, str]) -> dict[str, Any]:
    response = await client.post(
        f"{ADMIN}/invitations",
        headers=headers,
        json={"email": f"{unique('invitee')}@example.com", "role": "VIEWER"},
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def _tenant(client: httpx.AsyncClient) -> Tenant:
    admin = await new_org_admin(client)
    member = await new_member(client, admin, "DEVELOPER")
    return Tenant(
        admin=admin,
        member=member,
        invitation=await _invite(client, admin.headers),
        api_key=await new_api_key(client, admin, role="VIEWER"),
        admin_key=await new_api_key(client, admin, role="ORG_ADMIN"),
        admin_session=await _current_session(client, admin),
        member_session=await _current_session(client, member),
    )


@pytest.fixture
async def tenants(client: httpx.AsyncClient) -> tuple[Tenant, Tenant]:
    a = await _tenant(client)
    b = await _tenant(client)
    assert a.org_id != b.org_id
    return a, b


async def _get(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> Any:
    response = await client.get(path, headers=headers)
    assert response.status_code == 200, f"GET {path}: {response.text}"
    return response.json()


async def _snapshot(client: httpx.AsyncClient, tenant: Tenant) -> dict[str, Any]:
    """Everything the tenant's own admin and member can see of the tenant (reads only)."""
    headers = tenant.admin.headers
    return {
        "organization": await _get(client, f"{ADMIN}/organization", headers),
        "members": await _get(client, f"{ADMIN}/members", headers),
        "invitations": await _get(client, f"{ADMIN}/invitations", headers),
        "api_keys": await _get(client, f"{ADMIN}/api-keys", headers),
        "admin_sessions": await _get(client, f"{ADMIN}/sessions", headers),
        "member_sessions": await _get(client, f"{ADMIN}/sessions", tenant.member.headers),
    }


async def _assert_still_alive(client: httpx.AsyncClient, tenant: Tenant) -> None:
    """The tenant's tokens and keys still authenticate, with the tenant's own roles."""
    for account, role in ((tenant.admin, "ORG_ADMIN"), (tenant.member, "DEVELOPER")):
        response = await client.get("/api/v1/auth/validate", headers=account.headers)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["valid"] is True, body
        assert body["org_id"] == tenant.org_id
        assert body["role"] == role
    for key in (tenant.api_key, tenant.admin_key):
        response = await client.get("/api/v1/auth/validate", headers={"X-API-Key": key["key"]})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["valid"] is True, body
        assert body["org_id"] == tenant.org_id


def _leaks(response: httpx.Response, other: Tenant) -> list[str]:
    return sorted(m for m in other.markers() if m in response.text)


# --- endpoints that take an id ----------------------------------------------------------


@dataclass(frozen=True)
class IdCase:
    method: str
    template: str  # path with an ``{id}`` placeholder
    target: Callable[[Tenant], str]  # the id, in a given tenant
    body: dict[str, Any] | None
    # The same call on the caller's own tenant, to show the id and path are real:
    control_actor: str  # "admin" or "member"
    control_status: int
    control_code: str | None = None

    def path(self, object_id: str) -> str:
        return self.template.format(id=object_id)


ID_CASES = {
    "promote-member": IdCase(
        "PATCH",
        f"{ADMIN}/members/{{id}}",
        lambda t: t.member.user_id,
        {"role": "ORG_ADMIN"},
        "admin",
        200,
    ),
    "demote-admin": IdCase(
        "PATCH",
        f"{ADMIN}/members/{{id}}",
        lambda t: t.admin.user_id,
        {"role": "VIEWER"},
        "admin",
        409,
        "last_admin",
    ),
    "remove-member": IdCase(
        "DELETE", f"{ADMIN}/members/{{id}}", lambda t: t.member.user_id, None, "admin", 204
    ),
    "remove-admin": IdCase(
        "DELETE",
        f"{ADMIN}/members/{{id}}",
        lambda t: t.admin.user_id,
        None,
        "admin",
        409,
        "last_admin",
    ),
    "revoke-invitation": IdCase(
        "DELETE",
        f"{ADMIN}/invitations/{{id}}",
        lambda t: t.invitation["id"],
        None,
        "admin",
        204,
    ),
    "revoke-api-key": IdCase(
        "DELETE", f"{ADMIN}/api-keys/{{id}}", lambda t: t.api_key["id"], None, "admin", 204
    ),
    "revoke-admin-key": IdCase(
        "DELETE", f"{ADMIN}/api-keys/{{id}}", lambda t: t.admin_key["id"], None, "admin", 204
    ),
    "revoke-admin-session": IdCase(
        "DELETE", f"{ADMIN}/sessions/{{id}}", lambda t: t.admin_session, None, "admin", 204
    ),
    "revoke-member-session": IdCase(
        "DELETE", f"{ADMIN}/sessions/{{id}}", lambda t: t.member_session, None, "member", 204
    ),
}


@pytest.mark.parametrize("case", list(ID_CASES.values()), ids=list(ID_CASES))
async def test_another_tenants_ids_are_not_found_and_left_unchanged(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant], case: IdCase
) -> None:
    a, b = tenants
    before = await _snapshot(client, b)

    for caller in (a.admin.headers, a.key_headers):
        unknown = await client.request(
            case.method, case.path(str(uuid.uuid4())), headers=caller, json=case.body
        )
        assert unknown.status_code == 404, unknown.text
        crossed = await client.request(
            case.method, case.path(case.target(b)), headers=caller, json=case.body
        )
        assert crossed.status_code == 404, crossed.text
        error = crossed.json()["error"]
        assert error["code"] == "not_found"
        assert error["message"]
        # B's ids are indistinguishable from ids that do not exist: no existence oracle.
        assert crossed.json() == unknown.json()
        assert _leaks(crossed, b) == []

    assert await _snapshot(client, b) == before
    await _assert_still_alive(client, b)

    # The same call on A's own object reaches it: the 404 above was the tenant boundary.
    actor = a.admin if case.control_actor == "admin" else a.member
    own = await client.request(
        case.method, case.path(case.target(a)), headers=actor.headers, json=case.body
    )
    assert own.status_code == case.control_status, own.text
    if case.control_code is not None:
        assert own.json()["error"]["code"] == case.control_code


async def test_another_tenants_admin_cannot_be_acted_on_by_a_platform_route(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant]
) -> None:
    """Suspending an organisation is for SUPER_ADMIN only: A's admin and key get 403."""
    a, b = tenants
    for caller in (a.admin.headers, a.key_headers):
        for action in ("suspend", "reactivate"):
            response = await client.post(
                f"{ADMIN}/organizations/{b.org_id}/{action}", headers=caller
            )
            assert response.status_code == 403, response.text
            assert response.json()["error"]["code"] == "forbidden"
        listing = await client.get(f"{ADMIN}/organizations", headers=caller)
        assert listing.status_code == 403, listing.text
    organization = await _get(client, f"{ADMIN}/organization", b.admin.headers)
    assert organization["is_active"] is True
    await _assert_still_alive(client, b)


# --- lists ------------------------------------------------------------------------------


def _ids(rows: list[dict[str, Any]], key: str = "id") -> set[str]:
    return {row[key] for row in rows}


LISTS = ["organization", "members", "invitations", "api-keys", "sessions"]


@pytest.mark.parametrize("endpoint", LISTS)
async def test_lists_show_only_the_callers_tenant(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant], endpoint: str
) -> None:
    a, b = tenants
    for caller_kind, caller in (("token", a.admin.headers), ("api-key", a.key_headers)):
        response = await client.get(f"{ADMIN}/{endpoint}", headers=caller)
        assert response.status_code == 200, f"{caller_kind}: {response.text}"
        assert _leaks(response, b) == [], caller_kind
        body = response.json()
        if endpoint == "organization":
            assert body["id"] == a.org_id
            assert body["slug"] == a.admin.org_slug
        elif endpoint == "members":
            assert _ids(body, "user_id") == {a.admin.user_id, a.member.user_id}
        elif endpoint == "invitations":
            # The member's (accepted) invitation and the pending one, both A's.
            assert a.invitation["id"] in _ids(body)
            assert {row["email"] for row in body} == {a.member.email, a.invitation["email"]}
        elif endpoint == "api-keys":
            assert _ids(body) == {a.api_key["id"], a.admin_key["id"]}
        elif caller_kind == "token":
            assert _ids(body) == {a.admin_session}
        else:
            assert body == []  # an API key has no login sessions

    # And the other way round: B's admin sees B's rows, not A's.
    response = await client.get(f"{ADMIN}/{endpoint}", headers=b.admin.headers)
    assert response.status_code == 200, response.text
    assert _leaks(response, a) == []
    own_marker = {
        "organization": b.org_id,
        "members": b.member.user_id,
        "invitations": b.invitation["id"],
        "api-keys": b.api_key["id"],
        "sessions": b.admin_session,
    }[endpoint]
    assert own_marker in response.text


async def test_an_api_key_is_bound_to_its_own_tenant(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant]
) -> None:
    a, b = tenants
    for headers in (a.key_headers, {"Authorization": f"Bearer {a.admin_key['key']}"}):
        validation = await client.get("/api/v1/auth/validate", headers=headers)
        assert validation.status_code == 200, validation.text
        assert validation.json()["valid"] is True
        assert validation.json()["org_id"] == a.org_id
        assert validation.json()["api_key_id"] == a.admin_key["id"]
    # A key cannot move itself into another organisation.
    switch = await client.post(
        "/api/v1/auth/switch-organization",
        headers=a.key_headers,
        json={"organization_id": b.org_id},
    )
    assert switch.status_code == 401, switch.text
    assert switch.json()["error"]["code"] == "invalid_token"
    # A's least privileged key reads A's organisation only.
    viewer = await client.get(f"{ADMIN}/organization", headers={"X-API-Key": a.api_key["key"]})
    assert viewer.status_code == 200, viewer.text
    assert viewer.json()["id"] == a.org_id
    assert _leaks(viewer, b) == []
    members = await client.get(f"{ADMIN}/members", headers={"X-API-Key": a.api_key["key"]})
    assert members.status_code == 200, members.text
    assert _ids(members.json(), "user_id") == {a.admin.user_id, a.member.user_id}


async def test_a_user_cannot_switch_into_a_tenant_they_do_not_belong_to(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant]
) -> None:
    a, b = tenants
    for body in ({"organization_id": b.org_id}, {"organization_slug": b.admin.org_slug}):
        response = await client.post(
            "/api/v1/auth/switch-organization", headers=a.admin.headers, json=body
        )
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "not_found"
        assert "access_token" not in response.text
    login = await client.post(
        "/api/v1/auth/login",
        json={
            "email": a.admin.email,
            "password": a.admin.password,
            "organization_slug": b.admin.org_slug,
        },
    )
    assert login.status_code == 404, login.text
    assert "access_token" not in login.text


# --- writes -----------------------------------------------------------------------------


async def test_writes_land_only_in_the_callers_tenant(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant], runtime: IdentityRuntime
) -> None:
    a, b = tenants
    before = await _snapshot(client, b)
    created_invitations: list[str] = []
    created_keys: list[str] = []
    for caller in (a.admin.headers, a.key_headers):
        created_invitations.append((await _invite(client, caller))["id"])
        key = await client.post(
            f"{ADMIN}/api-keys", headers=caller, json={"name": unique("key"), "role": "VIEWER"}
        )
        assert key.status_code == 201, key.text
        created_keys.append(key.json()["id"])
        renamed = await client.patch(
            f"{ADMIN}/organization", headers=caller, json={"name": unique("A renamed")}
        )
        assert renamed.status_code == 200, renamed.text
        assert renamed.json()["id"] == a.org_id
    demoted = await client.patch(
        f"{ADMIN}/members/{a.member.user_id}", headers=a.admin.headers, json={"role": "VIEWER"}
    )
    assert demoted.status_code == 200, demoted.text

    # B sees nothing new; A sees all of it.
    assert await _snapshot(client, b) == before
    a_invitations = _ids(await _get(client, f"{ADMIN}/invitations", a.admin.headers))
    assert set(created_invitations) <= a_invitations
    a_keys = _ids(await _get(client, f"{ADMIN}/api-keys", a.admin.headers))
    assert set(created_keys) <= a_keys

    # In the database, as B's tenant sees it: none of A's new rows nor A's audit trail.
    a_actors = {a.admin.user_id, a.admin_key["id"]}
    async with runtime.database.transaction(uuid.UUID(b.org_id)) as uow:
        for table, ids in (("invitation", created_invitations), ("api_key", created_keys)):
            found = await uow.session.execute(
                text(f"SELECT count(*) FROM {table} WHERE id = ANY(CAST(:ids AS uuid[]))"),  # noqa: S608
                {"ids": ids},
            )
            assert found.scalar_one() == 0, table
        foreign_audit = await uow.session.execute(
            text(
                "SELECT count(*) FROM audit_log WHERE CAST(actor_user_id AS text) = ANY(:actors)"
                " OR CAST(actor_api_key_id AS text) = ANY(:actors)"
            ),
            {"actors": sorted(a_actors)},
        )
        assert foreign_audit.scalar_one() == 0
    async with runtime.database.transaction(uuid.UUID(a.org_id)) as uow:
        rows = await uow.session.execute(
            text(
                "SELECT CAST(org_id AS text) FROM invitation WHERE id = ANY(CAST(:ids AS uuid[]))"
            ),
            {"ids": created_invitations},
        )
        assert [r[0] for r in rows] == [a.org_id] * len(created_invitations)
        audited = await uow.session.execute(
            text(
                "SELECT action FROM audit_log WHERE CAST(actor_user_id AS text) = ANY(:actors)"
                " OR CAST(actor_api_key_id AS text) = ANY(:actors)"
            ),
            {"actors": sorted(a_actors)},
        )
        actions = {r[0] for r in audited}
        assert {"member.invited", "api_key.created", "organization.updated"} <= actions


SMUGGLING_WRITES = [
    ("POST", "invitations", {"email": "smuggled@example.com", "role": "VIEWER"}),
    ("POST", "api-keys", {"name": "smuggled", "role": "VIEWER"}),
    ("PATCH", "organization", {"name": "Smuggled"}),
]


async def test_a_body_cannot_name_another_tenant(
    client: httpx.AsyncClient, tenants: tuple[Tenant, Tenant]
) -> None:
    """Tenant ids in a body are refused (the tenant comes from the credential only)."""
    a, b = tenants
    before = await _snapshot(client, b)
    for method, path, body in SMUGGLING_WRITES:
        for field in ("org_id", "organization_id"):
            response = await client.request(
                method, f"{ADMIN}/{path}", headers=a.admin.headers, json={**body, field: b.org_id}
            )
            assert response.status_code == 422, f"{method} {path}: {response.text}"
            assert response.json()["error"]["code"]
        # Without the smuggled field the same write is accepted, in A.
        accepted = await client.request(
            method, f"{ADMIN}/{path}", headers=a.admin.headers, json=body
        )
        assert accepted.status_code in (200, 201), accepted.text
    assert await _snapshot(client, b) == before
    assert "smuggled" not in json.dumps(before).lower()
    assert "smuggled" in json.dumps(await _snapshot(client, a)).lower()

"""Auth flows through HTTP: register, login, refresh rotation, logout, profile, password,
switching organisations, MFA, invitations, introspection and the JWKS."""

from __future__ import annotations

import time
import uuid

import httpx
import jwt
import pyotp
import pytest
from sqlalchemy import text

from tests.identity.factories import (
    PASSWORD,
    bearer,
    login,
    new_api_key,
    new_member,
    new_org_admin,
    unique,
)


async def test_register_creates_user_and_organisation_with_admin_role(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(
        "/api/v1/auth/register",
        json={
            "email": "Founder@Example.com",
            "password": PASSWORD,
            "name": "Founder",
            "organization_name": "Acme Labs",
            "organization_slug": "acme-labs",
        },
    )
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["role"] == "ORG_ADMIN"
    assert body["organization"]["slug"] == "acme-labs"
    assert body["organization"]["name"] == "Acme Labs"
    assert body["user"]["email"] == "Founder@example.com"  # domain normalised, local part kept
    uuid.UUID(body["user"]["id"])


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"password": "short"}, "password"),
        ({"password": "x" * 129}, "password"),
        ({"email": "not-an-email"}, "email"),
        ({"organization_slug": "Bad Slug!"}, "organization_slug"),
        ({"organization_slug": None}, None),
    ],
)
async def test_register_rejects_bad_input_with_422(
    client: httpx.AsyncClient, override: dict[str, object], field: str | None
) -> None:
    body = {
        "email": "a@example.com",
        "password": PASSWORD,
        "name": "A",
        "organization_name": "A",
        "organization_slug": "a-org",
        **override,
    }
    response = await client.post("/api/v1/auth/register", json=body)
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "validation_error"
    if field:
        assert any(d["loc"][-1] == field for d in error["details"]), error


async def test_email_is_unique_case_insensitively_and_slugs_are_unique(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client, slug="taken-slug")
    again = await client.post(
        "/api/v1/auth/register",
        json={
            "email": admin.email.upper(),
            "password": PASSWORD,
            "name": "Dup",
            "organization_name": "Other",
            "organization_slug": "other-slug",
        },
    )
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "email_taken"
    slug = await client.post(
        "/api/v1/auth/register",
        json={
            "email": "new@example.com",
            "password": PASSWORD,
            "name": "New",
            "organization_name": "Other",
            "organization_slug": "taken-slug",
        },
    )
    assert slug.status_code == 409
    assert slug.json()["error"]["code"] == "slug_taken"


async def test_login_returns_the_documented_token_shape(
    client: httpx.AsyncClient, runtime: object
) -> None:
    admin = await new_org_admin(client)
    tokens = await login(client, admin.email.upper())
    assert set(tokens) == {
        "access_token",
        "refresh_token",
        "token_type",
        "expires_in",
        "user",
        "organization",
        "role",
    }
    assert tokens["token_type"] == "bearer"
    assert 890 <= tokens["expires_in"] <= 900
    assert tokens["user"] == {"id": admin.user_id, "email": admin.email, "name": "Admin"}
    assert tokens["organization"]["slug"] == admin.org_slug
    header = jwt.get_unverified_header(tokens["access_token"])
    assert header["alg"] == "RS256"
    assert header["kid"] == runtime.keyring.current.kid  # type: ignore[attr-defined]
    claims = jwt.decode(tokens["access_token"], options={"verify_signature": False})
    assert set(claims) >= {"sub", "org", "role", "sid", "jti", "iat", "nbf", "exp", "iss", "aud"}
    assert claims["sub"] == admin.user_id
    assert claims["org"] == admin.org_id
    assert claims["role"] == "ORG_ADMIN"


async def test_wrong_password_and_unknown_email_are_indistinguishable(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    wrong = await client.post(
        "/api/v1/auth/login", json={"email": admin.email, "password": "wrong-password"}
    )
    unknown = await client.post(
        "/api/v1/auth/login", json={"email": "nobody@example.com", "password": "wrong-password"}
    )
    assert wrong.status_code == unknown.status_code == 401
    assert wrong.json() == unknown.json()
    assert wrong.json()["error"]["code"] == "invalid_credentials"


async def test_refresh_rotates_and_the_old_refresh_token_stops_working(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    first = await client.post("/api/v1/auth/refresh", json={"refresh_token": admin.refresh_token})
    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refresh_token"] != admin.refresh_token
    assert rotated["access_token"] != admin.access_token
    profile = await client.get("/api/v1/auth/profile", headers=bearer(rotated["access_token"]))
    assert profile.status_code == 200
    second = await client.post(
        "/api/v1/auth/refresh", json={"refresh_token": rotated["refresh_token"]}
    )
    assert second.status_code == 200
    reused = await client.post("/api/v1/auth/refresh", json={"refresh_token": admin.refresh_token})
    assert reused.status_code == 401
    # Reuse revoked the whole family: the newest tokens of that session die too.
    newest = second.json()
    assert (
        await client.get("/api/v1/auth/profile", headers=bearer(newest["access_token"]))
    ).status_code == 401
    assert (
        await client.post("/api/v1/auth/refresh", json={"refresh_token": newest["refresh_token"]})
    ).status_code == 401


async def test_logout_revokes_access_tokens_at_once(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    other_session = await login(client, admin.email)
    out = await client.post("/api/v1/auth/logout", headers=admin.headers)
    assert out.status_code == 204
    after = await client.get("/api/v1/auth/profile", headers=admin.headers)
    assert after.status_code == 401
    assert after.json()["error"]["code"] == "invalid_token"
    refresh = await client.post("/api/v1/auth/refresh", json={"refresh_token": admin.refresh_token})
    assert refresh.status_code == 401
    # Another login session of the same user is untouched.
    still = await client.get("/api/v1/auth/profile", headers=bearer(other_session["access_token"]))
    assert still.status_code == 200


async def test_anonymous_requests_get_401(client: httpx.AsyncClient) -> None:
    for method, path in [
        ("GET", "/api/v1/auth/profile"),
        ("POST", "/api/v1/auth/logout"),
        ("GET", "/api/v1/admin/members"),
        ("GET", "/api/v1/admin/api-keys"),
    ]:
        response = await client.request(method, path)
        assert response.status_code == 401, path
        assert response.json()["error"]["code"] == "unauthorized"


async def test_profile_read_update_and_memberships(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    patched = await client.patch(
        "/api/v1/auth/profile",
        headers=admin.headers,
        json={"name": "Ada Lovelace", "profile": {"timezone": "Europe/London"}},
    )
    assert patched.status_code == 200, patched.text
    profile = (await client.get("/api/v1/auth/profile", headers=admin.headers)).json()
    assert profile["name"] == "Ada Lovelace"
    assert profile["profile"] == {"timezone": "Europe/London"}
    assert profile["role"] == "ORG_ADMIN"
    assert profile["organizations"] == [
        {
            "organization": {
                "id": admin.org_id,
                "slug": admin.org_slug,
                "name": profile["organizations"][0]["organization"]["name"],
            },
            "role": "ORG_ADMIN",
        }
    ]
    extra = await client.patch("/api/v1/auth/profile", headers=admin.headers, json={"bogus": 1})
    assert extra.status_code == 422


async def test_password_change_revokes_other_sessions_and_needs_the_current_one(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    other = await login(client, admin.email)
    wrong = await client.post(
        "/api/v1/auth/password",
        headers=admin.headers,
        json={"current_password": "not-it-at-all", "new_password": "a new long password"},
    )
    assert wrong.status_code == 401
    changed = await client.post(
        "/api/v1/auth/password",
        headers=admin.headers,
        json={"current_password": PASSWORD, "new_password": "a new long password"},
    )
    assert changed.status_code == 204
    assert (await client.get("/api/v1/auth/profile", headers=admin.headers)).status_code == 200
    assert (
        await client.get("/api/v1/auth/profile", headers=bearer(other["access_token"]))
    ).status_code == 401
    old = await client.post("/api/v1/auth/login", json={"email": admin.email, "password": PASSWORD})
    assert old.status_code == 401
    await login(client, admin.email, "a new long password")


async def test_switch_organisation_gives_tokens_for_another_membership(
    client: httpx.AsyncClient,
) -> None:
    first = await new_org_admin(client)
    second = await new_org_admin(client)
    invite = await client.post(
        "/api/v1/admin/invitations",
        headers=second.headers,
        json={"email": first.email, "role": "DEVELOPER"},
    )
    accepted = await client.post(
        "/api/v1/auth/invitations/accept",
        headers=first.headers,
        json={"token": invite.json()["token"]},
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["role"] == "DEVELOPER"
    switched = await client.post(
        "/api/v1/auth/switch-organization",
        headers=first.headers,
        json={"organization_slug": second.org_slug},
    )
    assert switched.status_code == 200, switched.text
    body = switched.json()
    assert body["organization"]["id"] == second.org_id
    assert body["role"] == "DEVELOPER"
    members = await client.get("/api/v1/admin/members", headers=bearer(body["access_token"]))
    assert {m["email"] for m in members.json()} == {first.email, second.email}
    stranger = await new_org_admin(client)
    refused = await client.post(
        "/api/v1/auth/switch-organization",
        headers=first.headers,
        json={"organization_id": stranger.org_id},
    )
    assert refused.status_code == 404


async def test_login_into_a_named_organisation(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    other = await new_org_admin(client)
    tokens = await login(client, admin.email, organization_slug=admin.org_slug)
    assert tokens["organization"]["id"] == admin.org_id
    refused = await client.post(
        "/api/v1/auth/login",
        json={"email": admin.email, "password": PASSWORD, "organization_slug": other.org_slug},
    )
    assert refused.status_code == 404


async def test_mfa_enrol_verify_then_login_requires_a_code(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    enrol = await client.post("/api/v1/auth/mfa/enroll", headers=admin.headers)
    assert enrol.status_code == 200
    secret = enrol.json()["secret"]
    assert enrol.json()["otpauth_uri"].startswith("otpauth://totp/")
    totp = pyotp.TOTP(secret)
    bad = await client.post(
        "/api/v1/auth/mfa/verify",
        headers=admin.headers,
        json={"code": "000000" if totp.now() != "000000" else "111111"},
    )
    assert bad.status_code == 401
    ok = await client.post(
        "/api/v1/auth/mfa/verify", headers=admin.headers, json={"code": totp.now()}
    )
    assert ok.status_code == 204
    missing = await client.post(
        "/api/v1/auth/login", json={"email": admin.email, "password": PASSWORD}
    )
    assert missing.status_code == 401
    assert missing.json()["error"]["code"] == "mfa_required"
    await login(client, admin.email, totp_code=totp.now())
    off = await client.post(
        "/api/v1/auth/mfa/disable", headers=admin.headers, json={"code": totp.now()}
    )
    assert off.status_code == 204
    await login(client, admin.email)


async def test_mfa_secret_is_encrypted_at_rest(
    client: httpx.AsyncClient, owner_engine: object
) -> None:
    admin = await new_org_admin(client)
    secret = (await client.post("/api/v1/auth/mfa/enroll", headers=admin.headers)).json()["secret"]
    async with owner_engine.connect() as conn:  # type: ignore[attr-defined]
        stored = (
            await conn.execute(
                text("SELECT mfa_secret FROM user_account WHERE id = :id"), {"id": admin.user_id}
            )
        ).scalar_one()
    assert stored
    assert secret not in stored


async def test_invitation_is_single_use_and_bound_to_its_email(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    email = f"{unique('invitee')}@example.com"
    invite = await client.post(
        "/api/v1/admin/invitations", headers=admin.headers, json={"email": email, "role": "VIEWER"}
    )
    assert invite.status_code == 201
    created = invite.json()
    assert set(created) == {"id", "email", "role", "expires_at", "token"}
    register = {"password": PASSWORD, "name": "I", "invitation_token": created["token"]}
    wrong_email = await client.post(
        "/api/v1/auth/register", json={**register, "email": "someone-else@example.com"}
    )
    assert wrong_email.status_code == 404
    ok = await client.post("/api/v1/auth/register", json={**register, "email": email})
    assert ok.status_code == 201, ok.text
    assert ok.json()["role"] == "VIEWER"
    assert ok.json()["organization"]["id"] == admin.org_id
    again = await client.post("/api/v1/auth/register", json={**register, "email": f"x{email}"})
    assert again.status_code == 404
    listed = (await client.get("/api/v1/admin/invitations", headers=admin.headers)).json()
    assert listed[0]["accepted_at"] is not None
    assert "token" not in listed[0]


async def test_revoked_invitation_cannot_be_used(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    email = f"{unique('r')}@example.com"
    invite = (
        await client.post("/api/v1/admin/invitations", headers=admin.headers, json={"email": email})
    ).json()
    revoked = await client.delete(
        f"/api/v1/admin/invitations/{invite['id']}", headers=admin.headers
    )
    assert revoked.status_code == 204
    used = await client.post(
        "/api/v1/auth/register",
        json={
            "email": email,
            "password": PASSWORD,
            "name": "R",
            "invitation_token": invite["token"],
        },
    )
    assert used.status_code == 404


async def test_api_key_authenticates_by_bearer_and_header_and_is_stored_hashed(
    client: httpx.AsyncClient, owner_engine: object
) -> None:
    admin = await new_org_admin(client)
    created = await new_api_key(client, admin, role="DEVELOPER")
    assert set(created) == {"id", "name", "prefix", "role", "permissions", "expires_at", "key"}
    assert created["key"].startswith(created["prefix"])
    for headers in (bearer(created["key"]), {"X-API-Key": created["key"]}):
        response = await client.get("/api/v1/admin/api-keys", headers=headers)
        assert response.status_code == 200, response.text
        assert "key" not in response.json()[0]
    async with owner_engine.connect() as conn:  # type: ignore[attr-defined]
        stored = (await conn.execute(text("SELECT token_hash, prefix FROM api_key"))).one()
    assert created["key"] not in stored.token_hash
    assert len(stored.token_hash) == 64
    revoked = await client.delete(f"/api/v1/admin/api-keys/{created['id']}", headers=admin.headers)
    assert revoked.status_code == 204
    gone = await client.get("/api/v1/admin/api-keys", headers=bearer(created["key"]))
    assert gone.status_code == 401


async def test_expired_api_key_is_refused(client: httpx.AsyncClient, owner_engine: object) -> None:
    admin = await new_org_admin(client)
    created = await new_api_key(client, admin, role="VIEWER")
    async with owner_engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.execute(
            text("UPDATE api_key SET expires_at = now() - interval '1 second' WHERE id = :id"),
            {"id": created["id"]},
        )
    response = await client.get("/api/v1/admin/organization", headers=bearer(created["key"]))
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "token_expired"


async def test_api_key_with_a_permission_subset_holds_only_those(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    created = await new_api_key(client, admin, permissions=["members:read"])
    assert created["role"] is None
    assert created["permissions"] == ["members:read"]
    headers = bearer(created["key"])
    assert (await client.get("/api/v1/admin/members", headers=headers)).status_code == 200
    assert (await client.get("/api/v1/admin/organization", headers=headers)).status_code == 403
    unknown = await client.post(
        "/api/v1/admin/api-keys",
        headers=admin.headers,
        json={"name": "x", "permissions": ["nope:never"]},
    )
    assert unknown.status_code == 422
    assert unknown.json()["error"]["code"] == "unknown_permission"


async def test_validate_introspects_tokens_and_keys(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    valid = (await client.get("/api/v1/auth/validate", headers=admin.headers)).json()
    assert valid["valid"] is True
    assert valid["kind"] == "user"
    assert valid["user_id"] == admin.user_id
    assert valid["org_id"] == admin.org_id
    assert valid["role"] == "ORG_ADMIN"
    assert "members:write" in valid["permissions"]
    assert abs(_epoch(valid["expires_at"]) - (time.time() + 900)) < 30
    key = await new_api_key(client, admin, role="VIEWER")
    as_key = (await client.get("/api/v1/auth/validate", headers=bearer(key["key"]))).json()
    assert as_key["kind"] == "api_key"
    assert as_key["api_key_id"] == key["id"]
    bogus = (await client.get("/api/v1/auth/validate", headers=bearer("nope"))).json()
    assert bogus == {**bogus, "valid": False, "error": "invalid_token"}
    none = (await client.get("/api/v1/auth/validate")).json()
    assert none["valid"] is False


def _epoch(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()


async def test_jwks_publishes_the_signing_key_by_kid(
    client: httpx.AsyncClient, runtime: object
) -> None:
    admin = await new_org_admin(client)
    jwks = (await client.get("/.well-known/jwks.json")).json()
    kid = jwt.get_unverified_header(admin.access_token)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    assert jwk["kty"] == "RSA"
    assert jwk["alg"] == "RS256"
    assert "d" not in jwk  # public only
    public = jwt.PyJWK(jwk).key
    claims = jwt.decode(admin.access_token, public, algorithms=["RS256"], audience="apix")
    assert claims["sub"] == admin.user_id


async def test_audit_log_records_auth_and_admin_actions(
    client: httpx.AsyncClient, owner_engine: object
) -> None:
    admin = await new_org_admin(client)
    member = await new_member(client, admin, "DEVELOPER")
    await client.patch(
        f"/api/v1/admin/members/{member.user_id}", headers=admin.headers, json={"role": "VIEWER"}
    )
    key = await new_api_key(client, admin, role="VIEWER")
    await client.delete(f"/api/v1/admin/api-keys/{key['id']}", headers=admin.headers)
    await client.post("/api/v1/auth/logout", headers=member.headers)
    async with owner_engine.connect() as conn:  # type: ignore[attr-defined]
        rows = (
            await conn.execute(
                text("SELECT action, outcome, request_id, ip FROM audit_log WHERE org_id = :o"),
                {"o": admin.org_id},
            )
        ).all()
    actions = {r.action for r in rows}
    assert {
        "user.registered",
        "auth.login",
        "member.invited",
        "member.role_changed",
        "api_key.created",
        "api_key.revoked",
    } <= actions
    assert all(r.request_id for r in rows)
    assert all(r.outcome == "success" for r in rows)

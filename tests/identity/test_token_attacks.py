"""Forged, stale and revoked access tokens are refused with 401 and introspect as invalid.

Forgeries start from the claims of a real token (a real user, organisation and session), so
each one differs from an accepted token in exactly the defect under test; the first test
proves that an unmodified re-signed copy is accepted, so every refusal below is caused by
the defect and not by the forging helpers.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import uuid
from dataclasses import replace
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from apix.identity.runtime import IdentityRuntime
from tests.identity.factories import (
    Account,
    bearer,
    login,
    new_api_key,
    new_org_admin,
    new_super_admin,
)

PROFILE = "/api/v1/auth/profile"
VALIDATE = "/api/v1/auth/validate"
REFRESH = "/api/v1/auth/refresh"
LOGOUT = "/api/v1/auth/logout"
ADMIN_ORG = "/api/v1/admin/organization"
REQUIRED_CLAIMS = ["sub", "org", "role", "sid", "jti", "iat", "nbf", "exp", "iss", "aud"]


# --- forging helpers --------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _json_segment(value: dict[str, Any]) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def _claims_of(token: str) -> dict[str, Any]:
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def _kid_of(token: str) -> str:
    kid = jwt.get_unverified_header(token)["kid"]
    assert isinstance(kid, str)
    return kid


def _sign(runtime: IdentityRuntime, claims: dict[str, Any]) -> str:
    """``claims`` signed with the node's real signing key: a valid signature."""
    key = runtime.keyring.current
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})


def _hmac_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """Built by hand: PyJWT refuses a PEM as an HMAC secret, an attacker's library need not."""
    signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
    mac = hmac.new(secret, signing_input.encode(), digest[header["alg"]]).digest()
    return f"{signing_input}.{_b64(mac)}"


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


async def _assert_refused(
    client: httpx.AsyncClient,
    headers: dict[str, str],
    code: str = "invalid_token",
    path: str = PROFILE,
) -> None:
    """401 with the error model on ``path``, and ``valid: false`` from the introspection."""
    response = await client.get(path, headers=headers)
    assert response.status_code == 401, response.text
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code, error
    validation = await client.get(VALIDATE, headers=headers)
    assert validation.status_code == 200, validation.text
    body = validation.json()
    assert body["valid"] is False, body
    assert body["error"] == code, body
    assert body["user_id"] is None
    assert body["role"] is None
    assert body["permissions"] == []


async def _assert_accepted(client: httpx.AsyncClient, headers: dict[str, str]) -> None:
    response = await client.get(PROFILE, headers=headers)
    assert response.status_code == 200, response.text
    validation = (await client.get(VALIDATE, headers=headers)).json()
    assert validation["valid"] is True, validation


# --- the control: the forging helpers produce acceptable tokens ---------------------------


async def test_a_resigned_copy_of_a_real_token_is_accepted(
    client: httpx.AsyncClient, runtime: IdentityRuntime
) -> None:
    admin = await new_org_admin(client)
    copy = _sign(runtime, _claims_of(admin.access_token))
    await _assert_accepted(client, bearer(copy))
    validation = (await client.get(VALIDATE, headers=bearer(copy))).json()
    assert validation["user_id"] == admin.user_id
    assert validation["role"] == "ORG_ADMIN"


# --- signature and algorithm attacks ------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "signature"),
    [("none", ""), ("None", ""), ("NONE", ""), ("none", "original")],
)
async def test_alg_none_token_is_refused(
    client: httpx.AsyncClient, alg: str, signature: str
) -> None:
    admin = await new_org_admin(client)
    claims = {**_claims_of(admin.access_token), "role": "SUPER_ADMIN"}
    header = {"alg": alg, "typ": "JWT", "kid": _kid_of(admin.access_token)}
    tail = admin.access_token.rsplit(".", 1)[1] if signature == "original" else ""
    forged = f"{_json_segment(header)}.{_json_segment(claims)}.{tail}"
    await _assert_refused(client, bearer(forged))


@pytest.mark.parametrize(
    ("alg", "pem_format"),
    [
        ("HS256", serialization.PublicFormat.SubjectPublicKeyInfo),
        ("HS256", serialization.PublicFormat.PKCS1),
        ("HS512", serialization.PublicFormat.SubjectPublicKeyInfo),
    ],
    ids=["HS256-spki", "HS256-pkcs1", "HS512-spki"],
)
async def test_hmac_token_keyed_with_the_public_key_is_refused(
    client: httpx.AsyncClient,
    runtime: IdentityRuntime,
    alg: str,
    pem_format: serialization.PublicFormat,
) -> None:
    """The classic RS256 -> HS256 confusion: the public key (published in the JWKS) as secret."""
    admin = await new_org_admin(client)
    public_pem = runtime.keyring.current.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, pem_format
    )
    header = {"alg": alg, "typ": "JWT", "kid": runtime.keyring.current.kid}
    forged = _hmac_token(header, _claims_of(admin.access_token), public_pem)
    await _assert_refused(client, bearer(forged))


@pytest.mark.parametrize(
    "kid",
    ["attacker-key", "../../../../etc/passwd", "", "REAL-KID", None, 0],
    ids=["unknown", "path-traversal", "empty", "real-kid-other-key", "missing", "not-a-string"],
)
async def test_token_signed_by_an_unknown_key_is_refused(
    client: httpx.AsyncClient,
    runtime: IdentityRuntime,
    attacker_key: rsa.RSAPrivateKey,
    kid: object,
) -> None:
    admin = await new_org_admin(client)
    claims = _claims_of(admin.access_token)
    header: dict[str, Any] = {"alg": "RS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = runtime.keyring.current.kid if kid == "REAL-KID" else kid
    signing_input = f"{_json_segment(header)}.{_json_segment(claims)}"
    # Signed by hand so that odd headers (a non-string kid) reach the server unchanged.
    signature = jwt.get_algorithm_by_name("RS256").sign(signing_input.encode(), attacker_key)
    forged = f"{signing_input}.{_b64(signature)}"
    await _assert_refused(client, bearer(forged))


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("role", "SUPER_ADMIN"),
        ("org", str(uuid.uuid5(uuid.NAMESPACE_URL, "another-organization"))),
        ("sub", str(uuid.uuid5(uuid.NAMESPACE_URL, "another-user"))),
        ("exp", 4_102_444_800),  # 2100-01-01
    ],
    ids=["role", "org", "sub", "exp"],
)
async def test_tampered_payload_with_the_original_signature_is_refused(
    client: httpx.AsyncClient, claim: str, value: object
) -> None:
    admin = await new_org_admin(client)
    header_segment, _, signature = admin.access_token.split(".")
    claims = {**_claims_of(admin.access_token), claim: value}
    forged = f"{header_segment}.{_json_segment(claims)}.{signature}"
    await _assert_refused(client, bearer(forged))
    # The genuine token still works: the refusal is the tampering, not the account.
    await _assert_accepted(client, admin.headers)


@pytest.mark.parametrize(
    "garbage",
    ["", "abc", "a.b.c", "....", "eyJhbGciOiJSUzI1NiJ9..", "x" * 5000],
    ids=["empty", "word", "three-junk-parts", "dots", "header-only", "huge"],
)
async def test_malformed_token_is_refused(client: httpx.AsyncClient, garbage: str) -> None:
    headers = bearer(garbage)
    response = await client.get(PROFILE, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] in {"invalid_token", "unauthorized"}
    validation = (await client.get(VALIDATE, headers=headers)).json()
    assert validation["valid"] is False


# --- valid signature, bad claims ----------------------------------------------------------


async def test_expired_token_is_refused_as_expired(
    client: httpx.AsyncClient, runtime: IdentityRuntime
) -> None:
    admin = await new_org_admin(client)
    now = int(time.time())
    claims = {**_claims_of(admin.access_token), "iat": now - 4000, "nbf": now - 4000}
    claims["exp"] = now - 60  # well past the verifier's 5 s leeway
    await _assert_refused(client, bearer(_sign(runtime, claims)), code="token_expired")


@pytest.mark.parametrize("claim", ["nbf", "iat"])
async def test_token_not_yet_valid_is_refused(
    client: httpx.AsyncClient, runtime: IdentityRuntime, claim: str
) -> None:
    admin = await new_org_admin(client)
    claims = {**_claims_of(admin.access_token), claim: int(time.time()) + 3600}
    await _assert_refused(client, bearer(_sign(runtime, claims)))


@pytest.mark.parametrize("issuer", ["evil", "APIX", "apix ", ""])
async def test_token_with_a_wrong_issuer_is_refused(
    client: httpx.AsyncClient, runtime: IdentityRuntime, issuer: str
) -> None:
    assert issuer != runtime.settings.auth.issuer
    admin = await new_org_admin(client)
    claims = {**_claims_of(admin.access_token), "iss": issuer}
    await _assert_refused(client, bearer(_sign(runtime, claims)))


@pytest.mark.parametrize("audience", ["other-service", ["other-service"], "APIX", []])
async def test_token_with_a_wrong_audience_is_refused(
    client: httpx.AsyncClient, runtime: IdentityRuntime, audience: object
) -> None:
    assert audience != runtime.settings.auth.audience
    admin = await new_org_admin(client)
    claims = {**_claims_of(admin.access_token), "aud": audience}
    await _assert_refused(client, bearer(_sign(runtime, claims)))


@pytest.mark.parametrize("claim", REQUIRED_CLAIMS)
async def test_token_missing_a_required_claim_is_refused(
    client: httpx.AsyncClient, runtime: IdentityRuntime, claim: str
) -> None:
    admin = await new_org_admin(client)
    claims = _claims_of(admin.access_token)
    assert claim in claims
    del claims[claim]
    await _assert_refused(client, bearer(_sign(runtime, claims)))


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("role", "GOD"),
        ("role", "super_admin"),
        ("sub", "1 OR 1=1"),
        ("org", "not-a-uuid"),
        ("sid", "not-a-uuid"),
        ("exp", "tomorrow"),
        # Correctly signed but of the wrong JSON type: must be a 401 like any bad claim.
        ("sid", ["not", "a", "uuid"]),
        ("sub", 12345),
        ("org", 42),
    ],
    ids=[
        "role-unknown",
        "role-lowercase",
        "sub-sql",
        "org-junk",
        "sid-junk",
        "exp-text",
        "sid-list",
        "sub-int",
        "org-int",
    ],
)
async def test_token_with_a_malformed_claim_is_refused(
    client: httpx.AsyncClient, runtime: IdentityRuntime, claim: str, value: object
) -> None:
    admin = await new_org_admin(client)
    claims = {**_claims_of(admin.access_token), claim: value}
    await _assert_refused(client, bearer(_sign(runtime, claims)))


async def test_platform_operator_token_without_an_organization_is_accepted(
    client: httpx.AsyncClient, runtime: IdentityRuntime
) -> None:
    """The counterpart of the missing-claim refusals: an empty ``org`` is not a missing claim.

    A SUPER_ADMIN who belongs to no organisation logs in without one (`org` is empty in the
    token) and must still reach the platform routes, which `require` admits without an
    organisation.
    """
    root = await new_super_admin(client, runtime)
    assert root["organization"] is None
    assert not _claims_of(root["access_token"])["org"]
    validation = (await client.get(VALIDATE, headers=bearer(root["access_token"]))).json()
    assert validation["valid"] is True, validation
    assert validation["role"] == "SUPER_ADMIN"
    response = await client.get("/api/v1/admin/organizations", headers=bearer(root["access_token"]))
    assert response.status_code == 200, response.text


# --- revocation: suspension, logout, refresh-token reuse ----------------------------------


async def _operator_headers(client: httpx.AsyncClient, runtime: IdentityRuntime) -> dict[str, str]:
    """A SUPER_ADMIN acting from an organisation of its own (never the suspended one)."""
    home = await new_org_admin(client)
    root = await new_super_admin(client, runtime)
    tokens = await login(client, root["user"]["email"], organization_slug=home.org_slug)
    assert tokens["role"] == "SUPER_ADMIN"
    return bearer(tokens["access_token"])


async def test_suspended_organization_tokens_and_api_keys_stop_working_until_reactivated(
    client: httpx.AsyncClient, runtime: IdentityRuntime
) -> None:
    admin = await new_org_admin(client)
    key = {"X-API-Key": (await new_api_key(client, admin, role="VIEWER"))["key"]}
    bystander = await new_org_admin(client)
    operator = await _operator_headers(client, runtime)
    await _assert_accepted(client, admin.headers)
    assert (await client.get(ADMIN_ORG, headers=key)).status_code == 200

    suspended = await client.post(
        f"/api/v1/admin/organizations/{admin.org_id}/suspend", headers=operator
    )
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["is_active"] is False

    await _assert_refused(client, admin.headers)
    await _assert_refused(client, admin.headers, path=ADMIN_ORG)
    await _assert_refused(client, key, path=ADMIN_ORG)
    relogin = await client.post(
        "/api/v1/auth/login", json={"email": admin.email, "password": admin.password}
    )
    assert relogin.status_code == 403, relogin.text
    assert relogin.json()["error"]["code"] == "organization_suspended"
    refreshed = await client.post(REFRESH, json={"refresh_token": admin.refresh_token})
    assert refreshed.status_code in {401, 403}, refreshed.text
    # Only that organisation is affected.
    await _assert_accepted(client, bystander.headers)

    reactivated = await client.post(
        f"/api/v1/admin/organizations/{admin.org_id}/reactivate", headers=operator
    )
    assert reactivated.status_code == 200, reactivated.text
    assert reactivated.json()["is_active"] is True
    await _assert_accepted(client, admin.headers)
    assert (await client.get(ADMIN_ORG, headers=key)).status_code == 200


async def test_only_a_super_admin_can_suspend_an_organization(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    other = await new_org_admin(client)
    for target in (admin.org_id, other.org_id):
        response = await client.post(
            f"/api/v1/admin/organizations/{target}/suspend", headers=admin.headers
        )
        assert response.status_code == 403, response.text
    await _assert_accepted(client, other.headers)


async def test_token_after_logout_is_refused(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    other_session = await login(client, admin.email)
    response = await client.post(LOGOUT, headers=admin.headers)
    assert response.status_code == 204, response.text
    await _assert_refused(client, admin.headers)
    refreshed = await client.post(REFRESH, json={"refresh_token": admin.refresh_token})
    assert refreshed.status_code == 401, refreshed.text
    assert refreshed.json()["error"]["code"] == "invalid_token"
    # Logging out ends that session only.
    await _assert_accepted(client, bearer(other_session["access_token"]))


async def test_refresh_token_reuse_revokes_the_whole_session(client: httpx.AsyncClient) -> None:
    admin: Account = await new_org_admin(client)
    first = await client.post(REFRESH, json={"refresh_token": admin.refresh_token})
    assert first.status_code == 200, first.text
    rotated = first.json()
    assert rotated["refresh_token"] != admin.refresh_token
    await _assert_accepted(client, bearer(rotated["access_token"]))

    reused = await client.post(REFRESH, json={"refresh_token": admin.refresh_token})
    assert reused.status_code == 401, reused.text
    assert reused.json()["error"]["code"] == "invalid_token"

    # Every access token of the session, old and new, and the rotated refresh token die.
    await _assert_refused(client, admin.headers)
    await _assert_refused(client, bearer(rotated["access_token"]))
    again = await client.post(REFRESH, json={"refresh_token": rotated["refresh_token"]})
    assert again.status_code == 401, again.text
    assert again.json()["error"]["code"] == "invalid_token"


async def test_a_verified_token_is_cached_but_still_expires_and_is_still_revocable(
    client: httpx.AsyncClient, runtime: Any
) -> None:
    admin = await new_org_admin(client)
    token = admin.access_token
    assert (await client.get("/api/v1/auth/profile", headers=admin.headers)).status_code == 200
    cached = runtime.verified.get(token)
    assert cached is not None, "the verified token is remembered"
    # Past its expiry (beyond the leeway), the cached entry is refused like the token.
    runtime.verified[token] = replace(cached, expires_at=int(time.time()) - 60)
    expired = await client.get("/api/v1/auth/profile", headers=admin.headers)
    assert (expired.status_code, expired.json()["error"]["code"]) == (401, "token_expired")
    runtime.verified[token] = cached
    # Logging out revokes the session: the cache does not keep the token alive.
    assert (await client.post("/api/v1/auth/logout", headers=admin.headers)).status_code == 204
    assert (await client.get("/api/v1/auth/profile", headers=admin.headers)).status_code == 401

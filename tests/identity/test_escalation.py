"""Privilege escalation is refused: nobody grants more than they hold, and nothing changes.

Every refusal is followed by a look at the state it protects (roles, keys, invitations), so
a 403 that still applied the change would fail too.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from tests.identity.factories import (
    Account,
    bearer,
    login,
    new_api_key,
    new_member,
    new_org_admin,
)

MEMBERS = "/api/v1/admin/members"
API_KEYS = "/api/v1/admin/api-keys"
INVITATIONS = "/api/v1/admin/invitations"
PROFILE = "/api/v1/auth/profile"


async def _roles(client: httpx.AsyncClient, admin: Account) -> dict[str, str]:
    response = await client.get(MEMBERS, headers=admin.headers)
    assert response.status_code == 200, response.text
    return {m["user_id"]: m["role"] for m in response.json()}


async def _key_names(client: httpx.AsyncClient, admin: Account) -> list[str]:
    response = await client.get(API_KEYS, headers=admin.headers)
    assert response.status_code == 200, response.text
    return [k["name"] for k in response.json()]


async def _invited(client: httpx.AsyncClient, admin: Account) -> list[str]:
    response = await client.get(INVITATIONS, headers=admin.headers)
    assert response.status_code == 200, response.text
    return [i["email"] for i in response.json()]


def _error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code, error
    return error


# --- users ------------------------------------------------------------------------------


@pytest.mark.parametrize("target_role", ["ORG_ADMIN", "DEVELOPER", "VIEWER"])
async def test_developer_cannot_change_their_own_role(
    client: httpx.AsyncClient, target_role: str
) -> None:
    admin = await new_org_admin(client)
    dev = await new_member(client, admin, "DEVELOPER")
    response = await client.patch(
        f"{MEMBERS}/{dev.user_id}", headers=dev.headers, json={"role": target_role}
    )
    _error(response, 403, "forbidden")
    assert (await _roles(client, admin))[dev.user_id] == "DEVELOPER"
    # Nor remove the admin standing in the way.
    removal = await client.delete(f"{MEMBERS}/{admin.user_id}", headers=dev.headers)
    _error(removal, 403, "forbidden")
    assert (await _roles(client, admin))[admin.user_id] == "ORG_ADMIN"


@pytest.mark.parametrize("body", [{"role": "VIEWER"}, {"permissions": ["organization:read"]}])
async def test_viewer_cannot_create_an_api_key(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    response = await client.post(
        API_KEYS, headers=viewer.headers, json={"name": "viewer-key", **body}
    )
    _error(response, 403, "forbidden")
    assert await _key_names(client, admin) == []


async def test_org_admin_cannot_grant_super_admin(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    dev = await new_member(client, admin, "DEVELOPER")

    for target in (dev.user_id, admin.user_id):
        response = await client.patch(
            f"{MEMBERS}/{target}", headers=admin.headers, json={"role": "SUPER_ADMIN"}
        )
        assert response.status_code in {403, 422}, response.text
        assert response.json()["error"]["code"] in {
            "validation_error",
            "permission_escalation",
            "forbidden",
        }
    invitation = await client.post(
        INVITATIONS,
        headers=admin.headers,
        json={"email": "root@example.com", "role": "SUPER_ADMIN"},
    )
    assert invitation.status_code in {403, 422}, invitation.text
    key_with_role = await client.post(
        API_KEYS, headers=admin.headers, json={"name": "root-key", "role": "SUPER_ADMIN"}
    )
    assert key_with_role.status_code in {403, 422}, key_with_role.text
    key_with_platform_permission = await client.post(
        API_KEYS,
        headers=admin.headers,
        json={"name": "platform-key", "permissions": ["platform:organizations"]},
    )
    error = _error(key_with_platform_permission, 403, "permission_escalation")
    assert error["details"]["excess"] == ["platform:organizations"]

    assert await _roles(client, admin) == {admin.user_id: "ORG_ADMIN", dev.user_id: "DEVELOPER"}
    assert await _invited(client, admin) == [dev.email]  # only the factory's invitation
    assert await _key_names(client, admin) == []
    relogin = await login(client, dev.email, organization_slug=admin.org_slug)
    assert relogin["role"] == "DEVELOPER"
    platform = await client.get("/api/v1/admin/organizations", headers=admin.headers)
    _error(platform, 403, "forbidden")


# --- API keys ---------------------------------------------------------------------------


async def test_api_key_cannot_mint_a_key_with_more_permissions_than_its_own(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    minter = await new_api_key(client, admin, permissions=["api_keys:write", "api_keys:read"])
    key_headers = {"X-API-Key": minter["key"]}

    attempts: list[tuple[dict[str, Any], list[str] | None]] = [
        ({"permissions": ["api_keys:read", "members:write"]}, ["members:write"]),
        ({"permissions": ["api_keys:write", "platform:admin"]}, ["platform:admin"]),
        ({"role": "ORG_ADMIN"}, None),
        ({"role": "DEVELOPER"}, None),
        ({"role": "VIEWER"}, None),  # VIEWER holds organization:read, the key does not
        ({}, None),  # no role and no permissions means VIEWER
    ]
    for index, (body, excess) in enumerate(attempts):
        response = await client.post(
            API_KEYS, headers=key_headers, json={"name": f"escalated-{index}", **body}
        )
        error = _error(response, 403, "permission_escalation")
        if excess is not None:
            assert error["details"]["excess"] == excess
    assert await _key_names(client, admin) == [minter["name"]]

    # The control: a subset, or the same set, may be minted.
    subset = await client.post(
        API_KEYS, headers=key_headers, json={"name": "subset", "permissions": ["api_keys:read"]}
    )
    assert subset.status_code == 201, subset.text
    assert subset.json()["permissions"] == ["api_keys:read"]
    same = await client.post(
        API_KEYS,
        headers=key_headers,
        json={"name": "same", "permissions": ["api_keys:read", "api_keys:write"]},
    )
    assert same.status_code == 201, same.text

    # A key without api_keys:write cannot mint at all, even a smaller key.
    reader = {"X-API-Key": subset.json()["key"]}
    refused = await client.post(
        API_KEYS, headers=reader, json={"name": "nothing", "permissions": ["api_keys:read"]}
    )
    _error(refused, 403, "forbidden")


async def test_api_key_with_member_and_invitation_rights_cannot_hand_out_admin(
    client: httpx.AsyncClient,
) -> None:
    """A permission-list key acts with the lowest role: it may not create an ORG_ADMIN."""
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    key = await new_api_key(
        client, admin, permissions=["members:read", "members:write", "invitations:write"]
    )
    headers = bearer(key["key"])

    promote = await client.patch(
        f"{MEMBERS}/{viewer.user_id}", headers=headers, json={"role": "ORG_ADMIN"}
    )
    _error(promote, 403, "permission_escalation")
    invite = await client.post(
        INVITATIONS, headers=headers, json={"email": "boss@example.com", "role": "ORG_ADMIN"}
    )
    _error(invite, 403, "permission_escalation")
    assert (await _roles(client, admin))[viewer.user_id] == "VIEWER"
    assert "boss@example.com" not in await _invited(client, admin)

    # The control: what the key's own level allows still works.
    plain = await client.post(
        INVITATIONS, headers=headers, json={"email": "reader@example.com", "role": "VIEWER"}
    )
    assert plain.status_code == 201, plain.text


async def test_developer_cannot_invite_or_mint_above_themselves(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    dev = await new_member(client, admin, "DEVELOPER")
    invite = await client.post(
        INVITATIONS, headers=dev.headers, json={"email": "x@example.com", "role": "ORG_ADMIN"}
    )
    _error(invite, 403, "forbidden")
    mint = await client.post(API_KEYS, headers=dev.headers, json={"name": "k", "role": "ORG_ADMIN"})
    _error(mint, 403, "forbidden")
    assert await _key_names(client, admin) == []


# --- the last ORG_ADMIN -----------------------------------------------------------------


@pytest.mark.parametrize("new_role", ["DEVELOPER", "VIEWER"])
async def test_last_org_admin_cannot_demote_or_remove_themselves(
    client: httpx.AsyncClient, new_role: str
) -> None:
    admin = await new_org_admin(client)
    await new_member(client, admin, "DEVELOPER")

    demote = await client.patch(
        f"{MEMBERS}/{admin.user_id}", headers=admin.headers, json={"role": new_role}
    )
    _error(demote, 409, "last_admin")
    remove = await client.delete(f"{MEMBERS}/{admin.user_id}", headers=admin.headers)
    _error(remove, 409, "last_admin")
    assert (await _roles(client, admin))[admin.user_id] == "ORG_ADMIN"
    # Refusals leave the admin's session alone.
    assert (await client.get(PROFILE, headers=admin.headers)).status_code == 200


async def test_with_a_second_admin_the_first_may_step_down_then_the_rule_applies_again(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    second = await new_member(client, admin, "ORG_ADMIN")
    step_down = await client.patch(
        f"{MEMBERS}/{admin.user_id}", headers=admin.headers, json={"role": "DEVELOPER"}
    )
    assert step_down.status_code == 200, step_down.text
    assert step_down.json()["role"] == "DEVELOPER"

    demote = await client.patch(
        f"{MEMBERS}/{second.user_id}", headers=second.headers, json={"role": "VIEWER"}
    )
    _error(demote, 409, "last_admin")
    remove = await client.delete(f"{MEMBERS}/{second.user_id}", headers=second.headers)
    _error(remove, 409, "last_admin")
    assert (await _roles(client, second))[second.user_id] == "ORG_ADMIN"


# --- role changes take effect at once ---------------------------------------------------


async def test_old_access_token_stops_working_after_a_role_change(
    client: httpx.AsyncClient,
) -> None:
    admin = await new_org_admin(client)
    dev = await new_member(client, admin, "DEVELOPER")
    assert (await client.get(API_KEYS, headers=dev.headers)).status_code == 200

    changed = await client.patch(
        f"{MEMBERS}/{dev.user_id}", headers=admin.headers, json={"role": "VIEWER"}
    )
    assert changed.status_code == 200, changed.text

    for path in (PROFILE, API_KEYS):
        response = await client.get(path, headers=dev.headers)
        _error(response, 401, "invalid_token")
    refreshed = await client.post("/api/v1/auth/refresh", json={"refresh_token": dev.refresh_token})
    _error(refreshed, 401, "invalid_token")

    fresh = await login(client, dev.email, organization_slug=admin.org_slug)
    assert fresh["role"] == "VIEWER"
    listing = await client.get(API_KEYS, headers=bearer(fresh["access_token"]))
    _error(listing, 403, "forbidden")
    # The admin's own session is untouched by the change.
    assert (await client.get(PROFILE, headers=admin.headers)).status_code == 200


async def test_old_access_token_stops_working_after_removal(client: httpx.AsyncClient) -> None:
    admin = await new_org_admin(client)
    dev = await new_member(client, admin, "DEVELOPER")
    removed = await client.delete(f"{MEMBERS}/{dev.user_id}", headers=admin.headers)
    assert removed.status_code == 204, removed.text
    _error(await client.get(PROFILE, headers=dev.headers), 401, "invalid_token")
    _error(await client.get(API_KEYS, headers=dev.headers), 401, "invalid_token")
    assert dev.user_id not in await _roles(client, admin)

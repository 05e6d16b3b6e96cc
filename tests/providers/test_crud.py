"""Provider CRUD over HTTP: permissions, tenancy, validation, secrets at rest, audit."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from apix.config import Settings
from apix.core.security import SecretBox
from tests.identity.factories import Account, new_api_key, new_member, new_org_admin
from tests.providers.factories import API_KEY, PROVIDERS, new_provider, provider_body


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


@pytest.fixture
async def other_admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


def _error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    if code is not None:
        assert body["code"] == code, body
    return body


async def test_an_admin_creates_reads_lists_updates_and_deletes_a_provider(
    client: httpx.AsyncClient, admin: Account
) -> None:
    created = await new_provider(
        client, admin, name="OpenAI", capabilities=["chat", "tools"], timeout_s=30
    )
    assert created["name"] == "OpenAI"
    assert created["kind"] == "openai"
    assert created["base_url"] is None
    assert created["effective_base_url"] == "https://api.openai.com/v1"
    assert created["capabilities"] == ["chat", "tools"]
    assert created["timeout_s"] == 30
    assert created["is_primary"] is True  # the organisation's first provider
    assert created["has_api_key"] is True
    assert created["api_key_last4"] == API_KEY[-4:]
    assert created["health"]["status"] == "unknown"
    assert created["health"]["circuit"] == "closed"

    got = await client.get(f"{PROVIDERS}/{created['id']}", headers=admin.headers)
    assert got.status_code == 200
    assert got.json() == created

    updated = await client.patch(
        f"{PROVIDERS}/{created['id']}",
        headers=admin.headers,
        json={"default_model": "gpt-4o", "base_url": "http://127.0.0.1:11434/v1", "api_key": None},
    )
    assert updated.status_code == 200, updated.text
    body = updated.json()
    assert body["default_model"] == "gpt-4o"
    assert body["effective_base_url"] == "http://127.0.0.1:11434/v1"
    assert body["has_api_key"] is False
    assert body["api_key_last4"] is None

    listed = await client.get(PROVIDERS, headers=admin.headers)
    assert [p["id"] for p in listed.json()] == [created["id"]]

    deleted = await client.delete(f"{PROVIDERS}/{created['id']}", headers=admin.headers)
    assert deleted.status_code == 204
    gone = await client.get(f"{PROVIDERS}/{created['id']}", headers=admin.headers)
    _error(gone, 404, "provider_not_found")


async def test_gemini_and_anthropic_default_to_their_public_endpoints(
    client: httpx.AsyncClient, admin: Account
) -> None:
    gemini = await new_provider(client, admin, kind="gemini", default_model="gemini-2.0-flash")
    claude = await new_provider(client, admin, kind="anthropic")
    assert gemini["effective_base_url"] == (
        "https://generativelanguage.googleapis.com/v1beta/openai/"
    )
    assert claude["effective_base_url"] == "https://api.anthropic.com"


async def test_anonymous_callers_get_401(client: httpx.AsyncClient, admin: Account) -> None:
    provider = await new_provider(client, admin)
    pid = provider["id"]
    for method, path in [
        ("GET", PROVIDERS),
        ("POST", PROVIDERS),
        ("GET", f"{PROVIDERS}/{pid}"),
        ("PATCH", f"{PROVIDERS}/{pid}"),
        ("DELETE", f"{PROVIDERS}/{pid}"),
        ("POST", f"{PROVIDERS}/{pid}/test"),
        ("GET", f"{PROVIDERS}/{pid}/usage"),
        ("POST", f"{PROVIDERS}/completions"),
        ("GET", "/api/v1/usage"),
        ("GET", "/api/v1/usage/prices"),
        ("PUT", "/api/v1/usage/prices/gpt-4o"),
    ]:
        response = await client.request(method, path, json={})
        _error(response, 401)


async def test_a_developer_reads_without_secrets_and_cannot_manage(
    client: httpx.AsyncClient, admin: Account
) -> None:
    provider = await new_provider(client, admin)
    developer = await new_member(client, admin, "DEVELOPER")
    listed = await client.get(PROVIDERS, headers=developer.headers)
    assert listed.status_code == 200
    assert API_KEY not in listed.text
    assert listed.json()[0]["has_api_key"] is True
    one = await client.get(f"{PROVIDERS}/{provider['id']}", headers=developer.headers)
    assert one.status_code == 200
    assert API_KEY not in one.text

    _error(await client.post(PROVIDERS, headers=developer.headers, json=provider_body()), 403)
    _error(
        await client.patch(
            f"{PROVIDERS}/{provider['id']}", headers=developer.headers, json={"name": "x"}
        ),
        403,
    )
    _error(await client.delete(f"{PROVIDERS}/{provider['id']}", headers=developer.headers), 403)


async def test_a_viewer_cannot_read_providers(client: httpx.AsyncClient, admin: Account) -> None:
    provider = await new_provider(client, admin)
    viewer = await new_member(client, admin, "VIEWER")
    _error(await client.get(PROVIDERS, headers=viewer.headers), 403)
    _error(await client.get(f"{PROVIDERS}/{provider['id']}", headers=viewer.headers), 403)
    _error(await client.post(f"{PROVIDERS}/{provider['id']}/test", headers=viewer.headers), 403)
    _error(await client.get("/api/v1/usage", headers=viewer.headers), 403)


async def test_an_api_key_with_providers_read_lists_but_cannot_create(
    client: httpx.AsyncClient, admin: Account
) -> None:
    await new_provider(client, admin)
    key = await new_api_key(client, admin, permissions=["providers:read"])
    headers = {"X-API-Key": key["key"]}
    assert (await client.get(PROVIDERS, headers=headers)).status_code == 200
    _error(await client.post(PROVIDERS, headers=headers, json=provider_body()), 403)


async def test_another_tenants_provider_is_404_everywhere(
    client: httpx.AsyncClient, admin: Account, other_admin: Account
) -> None:
    provider = await new_provider(client, admin)
    pid = provider["id"]
    headers = other_admin.headers
    _error(await client.get(f"{PROVIDERS}/{pid}", headers=headers), 404)
    _error(await client.patch(f"{PROVIDERS}/{pid}", headers=headers, json={"name": "x"}), 404)
    _error(await client.delete(f"{PROVIDERS}/{pid}", headers=headers), 404)
    _error(await client.post(f"{PROVIDERS}/{pid}/test", headers=headers), 404)
    _error(await client.get(f"{PROVIDERS}/{pid}/usage", headers=headers), 404)
    body = {"provider_id": pid, "messages": [{"role": "user", "content": "hi"}]}
    _error(await client.post(f"{PROVIDERS}/completions", headers=headers, json=body), 404)
    assert (await client.get(PROVIDERS, headers=headers)).json() == []
    # Nor can another tenant's provider join a fallback chain.
    mine = await new_provider(client, other_admin)
    response = await client.patch(
        f"{PROVIDERS}/{mine['id']}", headers=headers, json={"fallback_ids": [pid]}
    )
    _error(response, 400, "invalid_fallback_chain")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "cohere"}, "kind"),
        ({"name": ""}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"default_model": ""}, "default_model"),
        ({"base_url": "ftp://example.com"}, "base_url"),
        ({"base_url": "http://user:pw@example.com/v1"}, "base_url"),
        ({"base_url": "not a url"}, "base_url"),
        ({"timeout_s": 0}, "timeout_s"),
        ({"timeout_s": 601}, "timeout_s"),
        ({"capabilities": ["telepathy"]}, "capabilities"),
        ({"capabilities": ["chat", "chat"]}, "capabilities"),
        ({"capabilities": []}, "capabilities"),
        ({"fallback_ids": ["not-a-uuid"]}, "fallback_ids"),
        ({"api_key": ""}, "api_key"),
        ({"unknown": 1}, "unknown"),
    ],
)
async def test_invalid_provider_fields_get_422(
    client: httpx.AsyncClient, admin: Account, change: dict[str, Any], field: str
) -> None:
    response = await client.post(PROVIDERS, headers=admin.headers, json=provider_body(**change))
    error = _error(response, 422)
    assert field in str(error["details"]) or field in error["message"], error


async def test_null_for_a_required_field_in_an_update_is_422(
    client: httpx.AsyncClient, admin: Account
) -> None:
    provider = await new_provider(client, admin)
    for field in ("name", "default_model", "timeout_s", "capabilities", "fallback_ids"):
        response = await client.patch(
            f"{PROVIDERS}/{provider['id']}", headers=admin.headers, json={field: None}
        )
        _error(response, 422)


async def test_names_are_unique_per_organization(
    client: httpx.AsyncClient, admin: Account, other_admin: Account
) -> None:
    await new_provider(client, admin, name="Main")
    again = await client.post(PROVIDERS, headers=admin.headers, json=provider_body(name="Main"))
    _error(again, 409, "provider_name_taken")
    await new_provider(client, other_admin, name="Main")  # another tenant may
    second = await new_provider(client, admin, name="Second")
    rename = await client.patch(
        f"{PROVIDERS}/{second['id']}", headers=admin.headers, json={"name": "Main"}
    )
    _error(rename, 409, "provider_name_taken")


async def test_one_primary_per_organization(client: httpx.AsyncClient, admin: Account) -> None:
    first = await new_provider(client, admin)
    second = await new_provider(client, admin)
    assert first["is_primary"] is True
    assert second["is_primary"] is False
    third = await new_provider(client, admin, is_primary=True)
    assert third["is_primary"] is True
    listed = {
        p["id"]: p["is_primary"]
        for p in (await client.get(PROVIDERS, headers=admin.headers)).json()
    }
    assert listed == {first["id"]: False, second["id"]: False, third["id"]: True}
    promoted = await client.patch(
        f"{PROVIDERS}/{second['id']}", headers=admin.headers, json={"is_primary": True}
    )
    assert promoted.json()["is_primary"] is True
    listed = {
        p["id"]: p["is_primary"]
        for p in (await client.get(PROVIDERS, headers=admin.headers)).json()
    }
    assert listed == {first["id"]: False, second["id"]: True, third["id"]: False}


async def test_fallback_chains_name_existing_providers_without_self_or_cycles(
    client: httpx.AsyncClient, admin: Account
) -> None:
    a = await new_provider(client, admin)
    b = await new_provider(client, admin, fallback_ids=[a["id"]])
    assert b["fallback_ids"] == [a["id"]]

    unknown = await client.post(
        PROVIDERS, headers=admin.headers, json=provider_body(fallback_ids=[str(uuid.uuid4())])
    )
    _error(unknown, 400, "invalid_fallback_chain")
    repeated = await client.post(
        PROVIDERS, headers=admin.headers, json=provider_body(fallback_ids=[a["id"], a["id"]])
    )
    _error(repeated, 422)
    itself = await client.patch(
        f"{PROVIDERS}/{a['id']}", headers=admin.headers, json={"fallback_ids": [a["id"]]}
    )
    _error(itself, 400, "invalid_fallback_chain")
    # a -> b -> a would loop.
    cycle = await client.patch(
        f"{PROVIDERS}/{a['id']}", headers=admin.headers, json={"fallback_ids": [b["id"]]}
    )
    _error(cycle, 400, "invalid_fallback_chain")
    assert "cycle" in cycle.json()["error"]["message"]


async def test_deleting_a_provider_removes_it_from_other_chains(
    client: httpx.AsyncClient, admin: Account
) -> None:
    a = await new_provider(client, admin)
    c = await new_provider(client, admin)
    b = await new_provider(client, admin, fallback_ids=[a["id"], c["id"]])
    assert (await client.delete(f"{PROVIDERS}/{a['id']}", headers=admin.headers)).status_code == 204
    after = await client.get(f"{PROVIDERS}/{b['id']}", headers=admin.headers)
    assert after.json()["fallback_ids"] == [c["id"]]


async def test_the_api_key_is_encrypted_at_rest_and_never_returned_logged_or_audited(
    client: httpx.AsyncClient,
    admin: Account,
    owner_engine: Any,
    settings: Settings,
    capfd: pytest.CaptureFixture[str],
) -> None:
    provider = await new_provider(client, admin)
    changed = "sk-rotated-0123456789-abcdefgh-QRST"
    response = await client.patch(
        f"{PROVIDERS}/{provider['id']}", headers=admin.headers, json={"api_key": changed}
    )
    assert response.json()["api_key_last4"] == "QRST"
    short = await new_provider(client, admin, api_key="short-key")
    assert short["has_api_key"] is True
    assert short["api_key_last4"] is None  # a short key shows nothing of itself
    await client.delete(f"{PROVIDERS}/{short['id']}", headers=admin.headers)

    async with owner_engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT api_key_encrypted FROM provider WHERE id = :id"),
                {"id": provider["id"]},
            )
        ).scalar_one()
        audit = (
            await conn.execute(
                text(
                    "SELECT action, details::text FROM audit_log "
                    "WHERE target_type = 'provider' ORDER BY created_at"
                )
            )
        ).all()
    assert changed not in stored
    box = SecretBox(settings.secret_key.get_secret_value(), purpose="providers")
    assert box.decrypt(stored) == changed
    assert [a for a, _ in audit] == [
        "provider.created",
        "provider.updated",
        "provider.created",
        "provider.deleted",
    ]
    assert '"api_key": "set"' in audit[1][1]
    for _, details in audit:
        assert API_KEY not in details
        assert changed not in details
        assert "short-key" not in details
    out, err = capfd.readouterr()
    for secret in (API_KEY, changed, "short-key"):
        assert secret not in out
        assert secret not in err

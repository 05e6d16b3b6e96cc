"""Any payload to the provider writes is stored or refused with a typed 4xx, never a 5xx."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
import hypothesis
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st

from tests.identity.factories import Account, new_org_admin
from tests.providers.factories import PROVIDERS, new_provider

_PROPERTY = hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_HOSTILE_TEXT = st.one_of(
    st.text(max_size=300),
    st.sampled_from(
        [
            "before\x00after",
            "'; DROP TABLE provider; --",
            "\u202eevil\u202c",
            "x" * 1001,
            "http://127.0.0.1:99999/v1",
            "http://[::1/v1",
            "https://example.com/v1/",
            "javascript:alert(1)",
        ]
    ),
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _HOSTILE_TEXT,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=8,
)
_FIELDS = [
    "name",
    "kind",
    "base_url",
    "default_model",
    "capabilities",
    "timeout_s",
    "is_primary",
    "fallback_ids",
    "api_key",
]
_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "kind": st.sampled_from(["openai", "anthropic", "gemini", "OPENAI", ""]) | _JSON,
    "capabilities": st.lists(st.sampled_from(["chat", "tools", "vision", "embeddings", "x"]))
    | _JSON,
    "timeout_s": st.floats(allow_nan=False, allow_infinity=False) | _JSON,
    "fallback_ids": st.lists(st.uuids().map(str), max_size=3) | _JSON,
}
_BODY = st.fixed_dictionaries(
    {},
    optional={field: _VALUES.get(field, _HOSTILE_TEXT | _JSON) for field in _FIELDS},
)
_ACCEPTED = {200, 201, 204, 400, 404, 409, 422}


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


@_PROPERTY
@given(body=_BODY)
async def test_any_provider_payload_is_created_or_refused_with_a_typed_error(
    client: httpx.AsyncClient, admin: Account, body: dict[str, Any]
) -> None:
    response = await client.post(PROVIDERS, headers=admin.headers, json=body)
    assert response.status_code in _ACCEPTED, response.text
    if response.status_code != 201:
        assert set(response.json()["error"]) == {"code", "message", "details"}
        return
    created = response.json()
    key = body.get("api_key")
    if isinstance(key, str) and len(key) >= 8:
        assert key not in response.text
    stored = await client.get(f"{PROVIDERS}/{created['id']}", headers=admin.headers)
    assert stored.json() == created
    await client.delete(f"{PROVIDERS}/{created['id']}", headers=admin.headers)


@_PROPERTY
@given(body=_BODY)
async def test_any_provider_update_is_applied_or_refused_with_a_typed_error(
    client: httpx.AsyncClient, admin: Account, body: dict[str, Any]
) -> None:
    body.pop("kind", None)
    provider = await new_provider(client, admin)
    response = await client.patch(f"{PROVIDERS}/{provider['id']}", headers=admin.headers, json=body)
    assert response.status_code in _ACCEPTED, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"code", "message", "details"}
    await client.delete(f"{PROVIDERS}/{provider['id']}", headers=admin.headers)


@_PROPERTY
@given(
    model=_HOSTILE_TEXT,
    body=st.dictionaries(st.sampled_from(["input_per_mtok", "output_per_mtok", "x"]), _JSON),
)
async def test_any_price_is_stored_or_refused_with_a_typed_error(
    client: httpx.AsyncClient, admin: Account, model: str, body: dict[str, Any]
) -> None:
    response = await client.put(
        f"/api/v1/usage/prices/{quote(model, safe='')}",
        headers=admin.headers,
        json=body,
    )
    assert response.status_code in {*_ACCEPTED, 405}, response.text


@_PROPERTY
@given(
    params=st.dictionaries(
        st.sampled_from(["since", "until", "group_by", "provider_id", "agent_id", "model"]),
        _HOSTILE_TEXT,
        max_size=4,
    )
)
async def test_any_usage_query_answers_or_is_refused_with_a_typed_error(
    client: httpx.AsyncClient, admin: Account, params: dict[str, str]
) -> None:
    response = await client.get("/api/v1/usage", headers=admin.headers, params=params)
    assert response.status_code in _ACCEPTED, response.text

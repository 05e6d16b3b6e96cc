"""Factories for provider tests: providers made through the API, pointed at fake servers."""

from __future__ import annotations

from typing import Any

import httpx

from tests.identity.factories import Account, unique
from tests.providers.fakes import FakeServer, anthropic_url, openai_url

PROVIDERS = "/api/v1/providers"
API_KEY = "sk-test-0123456789abcdefWXYZ"


def provider_body(
    server: FakeServer | None = None, kind: str = "openai", **fields: Any
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": unique("provider"),
        "kind": kind,
        "default_model": "fake-claude" if kind == "anthropic" else "fake-gpt",
        "api_key": API_KEY,
        "timeout_s": 2.0,
    }
    if server is not None:
        body["base_url"] = anthropic_url(server) if kind == "anthropic" else openai_url(server)
    body.update(fields)
    return body


async def new_provider(
    client: httpx.AsyncClient,
    admin: Account,
    server: FakeServer | None = None,
    kind: str = "openai",
    **fields: Any,
) -> dict[str, Any]:
    response = await client.post(
        PROVIDERS, headers=admin.headers, json=provider_body(server, kind, **fields)
    )
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


async def complete(
    client: httpx.AsyncClient, account: Account, prompt: str = "Hello?", **target: Any
) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": prompt}], **target}
    return await client.post(f"{PROVIDERS}/completions", headers=account.headers, json=body)

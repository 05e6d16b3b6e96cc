"""`POST /providers/{id}/test`: one real call through the official SDKs to a local server."""

from __future__ import annotations

import httpx
import pytest

from tests.identity.factories import Account, new_member, new_org_admin
from tests.providers.factories import API_KEY, PROVIDERS, new_provider
from tests.providers.fakes import (
    Behaviour,
    FakeAnthropic,
    FakeOpenAI,
    FakeServer,
    drop,
    error,
    hang,
    ok,
)


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


async def _test(
    client: httpx.AsyncClient, account: Account, provider: dict[str, object], **body: object
) -> dict[str, object]:
    response = await client.post(
        f"{PROVIDERS}/{provider['id']}/test", headers=account.headers, json=body or None
    )
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("kind", ["openai", "anthropic", "gemini"])
async def test_a_test_call_returns_the_reply_latency_and_usage(
    client: httpx.AsyncClient,
    admin: Account,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    kind: str,
) -> None:
    server: FakeServer = fake_anthropic if kind == "anthropic" else fake_openai
    server.then(ok("OK", input_tokens=9, output_tokens=1))
    provider = await new_provider(client, admin, server, kind=kind)
    result = await _test(client, admin, provider)
    assert result["ok"] is True
    assert result["reply"] == "OK"
    assert result["usage"] == {"input_tokens": 9, "output_tokens": 1}
    assert result["model"] == provider["default_model"]
    assert isinstance(result["latency_ms"], float)
    assert result["latency_ms"] > 0
    assert result["error"] is None
    (call,) = server.calls
    # The real wire protocol, with streaming, the key and the tiny prompt.
    assert call["body"]["stream"] is True
    assert call["body"]["max_tokens"] == 16
    assert call["body"]["messages"] == [
        {"role": "user", "content": "Reply with the single word OK."}
    ]
    if kind == "anthropic":
        assert call["path"] == "/v1/messages"
    else:
        assert call["path"] == "/v1/chat/completions"
        assert call["body"]["stream_options"] == {"include_usage": True}
    headers = call["headers"]
    assert API_KEY in (headers.get("authorization", "") + headers.get("x-api-key", ""))


async def test_a_developer_may_test_with_its_own_prompt_and_model(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    developer = await new_member(client, admin, "DEVELOPER")
    provider = await new_provider(client, admin, fake_openai)
    result = await _test(client, developer, provider, prompt="Say hi", model="other", max_tokens=3)
    assert result["ok"] is True
    assert result["model"] == "other"
    assert fake_openai.calls[0]["body"]["model"] == "other"
    assert fake_openai.calls[0]["body"]["max_tokens"] == 3


@pytest.mark.parametrize(
    ("behaviour", "code", "status"),
    [
        (error(401, "Incorrect API key provided"), "provider_auth_error", 401),
        (error(403), "provider_auth_error", 403),
        (error(400, "model not found"), "provider_bad_request", 400),
        (error(429, "slow down"), "provider_rate_limited", 429),
        (error(500), "provider_unavailable", 500),
        (error(503), "provider_unavailable", 503),
        (hang(5), "provider_timeout", None),
        (drop(1), "provider_unavailable", None),
    ],
)
@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_failing_test_call_returns_the_providers_typed_error(
    client: httpx.AsyncClient,
    admin: Account,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    kind: str,
    behaviour: Behaviour,
    code: str,
    status: int | None,
) -> None:
    server: FakeServer = fake_anthropic if kind == "anthropic" else fake_openai
    server.then(behaviour)
    # A short timeout only where the server hangs: a loaded machine must not turn an
    # answered error into a timeout.
    timeout = 0.5 if behaviour.hang_s else 10.0
    provider = await new_provider(client, admin, server, kind=kind, timeout_s=timeout)
    result = await _test(client, admin, provider)
    assert result["ok"] is False
    assert result["reply"] is None
    error_body = result["error"]
    assert isinstance(error_body, dict)
    assert error_body["code"] == code
    assert error_body["provider_status"] == status
    if status == 401:
        assert error_body["message"] == "Incorrect API key provided"
    # A test is a single call: no retry even for retryable errors.
    assert len(server.calls) == 1
    usage = await client.get(f"{PROVIDERS}/{provider['id']}/usage", headers=admin.headers)
    assert usage.json()["totals"]["failed_calls"] == 1


async def test_a_test_call_to_an_unreachable_server_is_unavailable(
    client: httpx.AsyncClient, admin: Account
) -> None:
    provider = await new_provider(client, admin, base_url="http://127.0.0.1:9/v1", timeout_s=1)
    result = await _test(client, admin, provider)
    assert result["ok"] is False
    assert result["error"]["code"] == "provider_unavailable"  # type: ignore[index]


async def test_a_provider_without_an_api_key_is_called_without_one(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    # Local servers (Ollama, vLLM, llama.cpp) take no key.
    provider = await new_provider(client, admin, fake_openai, api_key=None)
    assert (await _test(client, admin, provider))["ok"] is True
    assert API_KEY not in str(fake_openai.calls[0]["headers"])

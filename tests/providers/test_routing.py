"""Routing through `POST /providers/completions` and `routing.stream`: retries with backoff,
failover along the fallback chain (every hop reported), policies, and the circuit breaker,
against local servers that fail on demand.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import text

from apix.core.security import SecretBox
from apix.providers import routing
from apix.providers.events import ProviderFallback
from apix.providers.runtime import ProvidersRuntime
from apix.providers.types import ChatMessage, ChatRequest, Completed, Reset, TextDelta
from tests.identity.factories import Account, new_member, new_org_admin
from tests.providers.factories import PROVIDERS, complete, new_provider
from tests.providers.fakes import FakeAnthropic, FakeOpenAI, drop, error, hang, ok


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


@pytest.fixture
def runtime(app: Any) -> ProvidersRuntime:
    state = app.state
    return ProvidersRuntime.create(
        state.settings, state.database, state.redis, state.gateway.broker
    )


async def _pair(
    client: httpx.AsyncClient, admin: Account, first: Any, second: Any, **fields: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Provider B, then provider A (primary) falling back to B."""
    kind_b = "anthropic" if isinstance(second, FakeAnthropic) else "openai"
    b = await new_provider(client, admin, second, kind=kind_b, name="B", is_primary=False)
    a = await new_provider(
        client, admin, first, name="A", is_primary=True, fallback_ids=[b["id"]], **fields
    )
    return a, b


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_a_routed_call_answers_and_reports_usage(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    fake_openai.then(ok("Bonjour tout le monde", input_tokens=12, output_tokens=5))
    provider = await new_provider(client, admin, fake_openai)
    developer = await new_member(client, admin, "DEVELOPER")
    result = _ok(await complete(client, developer, provider_id=provider["id"]))
    assert result["reply"] == "Bonjour tout le monde"
    assert result["provider_id"] == provider["id"]
    assert result["model"] == "fake-gpt"
    assert result["usage"] == {"input_tokens": 12, "output_tokens": 5}
    assert result["finish_reason"] == "stop"
    assert result["hops"] == []
    assert result["first_token_ms"] <= result["latency_ms"]


async def test_a_429_is_retried_with_backoff_on_the_same_provider(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    fake_openai.then(error(429), error(429), ok("third time lucky"))
    a, _ = await _pair(client, admin, fake_openai, fake_openai_2)
    result = _ok(await complete(client, admin, policy="fallback"))
    assert result["reply"] == "third time lucky"
    assert result["provider_id"] == a["id"]
    assert result["hops"] == []
    assert len(fake_openai.calls) == 3
    assert fake_openai_2.calls == []


@pytest.mark.parametrize(
    ("failure", "reason", "attempts"),
    [
        (error(500), "provider_unavailable", 3),
        (error(503), "provider_unavailable", 3),
        (error(429), "provider_rate_limited", 3),
        (hang(5), "provider_timeout", 3),
        (error(401), "provider_auth_error", 1),  # no retry: the key will not get better
    ],
)
async def test_after_the_retries_the_call_fails_over_along_the_chain(
    client: httpx.AsyncClient,
    admin: Account,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    failure: Any,
    reason: str,
    attempts: int,
) -> None:
    fake_openai.default = failure
    fake_anthropic.then(ok("from the fallback", input_tokens=3, output_tokens=4))
    timeout = 0.3 if failure.hang_s else 10.0  # short only where the server hangs
    a, b = await _pair(client, admin, fake_openai, fake_anthropic, timeout_s=timeout)
    result = _ok(await complete(client, admin, provider_id=a["id"]))
    assert result["reply"] == "from the fallback"
    assert result["provider_id"] == b["id"]
    assert result["model"] == "fake-claude"  # the fallback's own default model
    assert result["usage"] == {"input_tokens": 3, "output_tokens": 4}
    assert result["hops"] == [
        {
            "from_provider_id": a["id"],
            "from_provider_name": "A",
            "to_provider_id": b["id"],
            "to_provider_name": "B",
            "reason": reason,
            "message": result["hops"][0]["message"],
            "attempts": attempts,
            "restarted": False,
        }
    ]
    assert len(fake_openai.calls) == attempts


@pytest.mark.parametrize("kind", ["openai", "anthropic"])
async def test_a_stream_dropped_mid_answer_restarts_on_the_fallback(
    client: httpx.AsyncClient,
    admin: Account,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    fake_openai_2: FakeOpenAI,
    kind: str,
) -> None:
    first = fake_anthropic if kind == "anthropic" else fake_openai
    first.then(drop(2, "This answer is cut short"))
    fake_openai_2.then(ok("A whole answer."))
    b = await new_provider(client, admin, fake_openai_2, name="B")
    a = await new_provider(client, admin, first, kind=kind, name="A", fallback_ids=[b["id"]])
    result = _ok(await complete(client, admin, provider_id=a["id"]))
    # The partial answer is discarded, not glued to the fallback's.
    assert result["reply"] == "A whole answer."
    assert result["hops"][0]["restarted"] is True
    assert result["hops"][0]["reason"] == "provider_unavailable"
    assert result["hops"][0]["attempts"] == 1
    assert len(first.calls) == 1


async def test_the_stream_interface_yields_deltas_a_reset_and_completion(
    client: httpx.AsyncClient,
    admin: Account,
    runtime: ProvidersRuntime,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
) -> None:
    fake_openai.then(drop(2, "abcdefghijkl"))
    fake_anthropic.then(ok("0123456789", input_tokens=5, output_tokens=6))
    a, b = await _pair(client, admin, fake_openai, fake_anthropic)
    hops: list[ProviderFallback] = []

    async def on_fallback(hop: ProviderFallback) -> None:
        hops.append(hop)

    agent_id = uuid.uuid4()
    request = ChatRequest(
        messages=(ChatMessage("system", "Be brief."), ChatMessage("user", "Count.")),
        max_tokens=50,
        temperature=0.2,
    )
    chunks = [
        c
        async for c in routing.stream(
            runtime,
            uuid.UUID(admin.org_id),
            routing.ProviderTarget(uuid.UUID(a["id"])),
            request,
            agent_id=agent_id,
            on_fallback=on_fallback,
        )
    ]
    assert chunks[:2] == [TextDelta("abcd"), TextDelta("efgh")]
    assert chunks[2] == Reset(uuid.UUID(a["id"]), "provider_unavailable")
    assert [c.text for c in chunks[3:-1] if isinstance(c, TextDelta)] == ["0123", "4567", "89"]
    done = chunks[-1]
    assert isinstance(done, Completed)
    assert done.provider_id == uuid.UUID(b["id"])
    assert (done.usage.input_tokens, done.usage.output_tokens) == (5, 6)
    assert [h.type for h in hops] == ["provider.fallback"]
    assert hops[0].to_provider_id == uuid.UUID(b["id"])
    # The Anthropic request carried the system prompt apart, and the sampling settings.
    body = fake_anthropic.calls[0]["body"]
    assert body["system"] == "Be brief."
    assert body["messages"] == [{"role": "user", "content": "Count."}]
    assert (body["max_tokens"], body["temperature"]) == (50, 0.2)
    # Usage was metered against the agent.
    usage = await client.get(
        "/api/v1/usage", headers=admin.headers, params={"agent_id": str(agent_id)}
    )
    assert usage.json()["totals"]["input_tokens"] == 5


async def test_a_bad_request_is_not_retried_nor_failed_over(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    fake_openai.then(error(400, "context too long"))
    a, _ = await _pair(client, admin, fake_openai, fake_openai_2)
    response = await complete(client, admin, provider_id=a["id"])
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "provider_bad_request"
    assert response.json()["error"]["message"] == "context too long"
    assert len(fake_openai.calls) == 1
    assert fake_openai_2.calls == []


async def test_when_every_provider_fails_the_answer_is_503_with_the_hops(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    fake_openai.default = error(500)
    fake_openai_2.default = error(502)
    a, b = await _pair(client, admin, fake_openai, fake_openai_2)
    response = await complete(client, admin, policy="fallback")
    assert response.status_code == 503, response.text
    body = response.json()["error"]
    assert body["code"] == "no_provider_available"
    hops = body["details"]["hops"]
    assert [(h["from_provider_id"], h["to_provider_id"]) for h in hops] == [
        (a["id"], b["id"]),
        (b["id"], None),
    ]


async def test_the_primary_policy_uses_the_primary_alone(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    fake_openai.default = error(500)
    await _pair(client, admin, fake_openai, fake_openai_2)
    response = await complete(client, admin, policy="primary")
    assert response.status_code == 503, response.text
    assert fake_openai_2.calls == []
    assert _ok(await complete(client, admin, policy="fallback"))["reply"]


async def test_policies_need_a_primary_and_targets_are_validated(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    response = await complete(client, admin, policy="primary")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "no_primary_provider"
    provider = await new_provider(client, admin, fake_openai)
    both = await complete(client, admin, policy="primary", provider_id=provider["id"])
    assert both.status_code == 422
    neither = await complete(client, admin)
    assert neither.status_code == 422
    unknown = await complete(client, admin, policy="cheapest")
    assert unknown.status_code == 422


async def test_lowest_latency_picks_the_provider_measured_fastest(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    slow = await new_provider(client, admin, fake_openai, name="slow")
    fast = await new_provider(client, admin, fake_openai_2, name="fast")
    fake_openai.then(hang(1.0), hang(1.0))
    for provider in (slow, fast, slow, fast):
        response = await client.post(f"{PROVIDERS}/{provider['id']}/test", headers=admin.headers)
        assert response.json()["ok"] is True
    result = _ok(await complete(client, admin, policy="lowest_latency"))
    assert result["provider_id"] == fast["id"]
    assert len(fake_openai_2.calls) == 3
    # The request's model applies only to a named provider, not across vendors.
    result = _ok(await complete(client, admin, policy="lowest_latency", model="gpt-x"))
    assert fake_openai_2.calls[-1]["body"]["model"] == "fake-gpt"


async def test_capabilities_limit_the_candidates(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    embeddings = await new_provider(client, admin, fake_openai_2, capabilities=["embeddings"])
    await new_provider(client, admin, fake_openai, is_primary=True, fallback_ids=[embeddings["id"]])
    fake_openai.default = error(500)
    response = await complete(client, admin, policy="fallback")
    assert response.status_code == 503
    assert fake_openai_2.calls == []


async def test_an_open_circuit_is_skipped_until_a_half_open_probe_succeeds(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    # breaker_failures = 3 and breaker_open_s = 1.5 in these tests' settings.
    fake_openai.then(error(500), error(500), error(500))
    a, b = await _pair(client, admin, fake_openai, fake_openai_2)
    first = _ok(await complete(client, admin, policy="fallback"))
    assert first["provider_id"] == b["id"]
    health = (await client.get(f"{PROVIDERS}/{a['id']}", headers=admin.headers)).json()["health"]
    assert health["circuit"] == "open"
    assert health["status"] == "unhealthy"

    second = _ok(await complete(client, admin, policy="fallback"))
    assert second["provider_id"] == b["id"]
    assert second["hops"][0]["reason"] == "circuit_open"
    assert second["hops"][0]["attempts"] == 0
    assert len(fake_openai.calls) == 3  # skipped: not called at all

    await asyncio.sleep(1.6)
    third = _ok(await complete(client, admin, policy="fallback"))
    assert third["provider_id"] == a["id"]  # the probe succeeded
    health = (await client.get(f"{PROVIDERS}/{a['id']}", headers=admin.headers)).json()["health"]
    assert health["circuit"] == "closed"


async def test_a_failed_half_open_probe_opens_the_circuit_again(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    fake_openai.default = error(500)
    # A generous timeout: under load a probe must fail by the 500, not by timing out.
    _, b = await _pair(client, admin, fake_openai, fake_openai_2, timeout_s=30.0)
    _ok(await complete(client, admin, policy="fallback"))
    await asyncio.sleep(1.6)
    probe = _ok(await complete(client, admin, policy="fallback"))
    assert probe["provider_id"] == b["id"]
    assert probe["hops"][0]["attempts"] == 1  # a probe is one call, not three
    assert probe["hops"][0]["reason"] != "provider_timeout", probe["hops"]
    assert len(fake_openai.calls) == 4
    again = _ok(await complete(client, admin, policy="fallback"))
    assert again["hops"][0]["reason"] == "circuit_open"
    assert len(fake_openai.calls) == 4


async def test_completions_need_providers_use(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    provider = await new_provider(client, admin, fake_openai)
    viewer = await new_member(client, admin, "VIEWER")
    response = await complete(client, viewer, provider_id=provider["id"])
    assert response.status_code == 403
    assert fake_openai.calls == []


async def test_a_key_that_cannot_be_decrypted_fails_over_and_says_why(
    client: httpx.AsyncClient,
    admin: Account,
    owner_engine: Any,
    fake_openai: FakeOpenAI,
    fake_openai_2: FakeOpenAI,
) -> None:
    a, b = await _pair(client, admin, fake_openai, fake_openai_2)
    # As if APIX_SECRET_KEY had changed since the key was stored.
    stranger = SecretBox("another-secret-key-of-another-node", purpose="providers")
    async with owner_engine.begin() as conn:
        await conn.execute(
            text("UPDATE provider SET api_key_encrypted = :c WHERE id = :id"),
            {"c": stranger.encrypt("sk-whatever"), "id": a["id"]},
        )
    result = _ok(await complete(client, admin, policy="fallback"))
    assert result["provider_id"] == b["id"]
    assert result["hops"][0]["reason"] == "provider_auth_error"
    assert "set it again" in result["hops"][0]["message"]
    assert fake_openai.calls == []
    tested = await client.post(f"{PROVIDERS}/{a['id']}/test", headers=admin.headers)
    assert tested.status_code == 200
    assert tested.json()["error"]["code"] == "provider_auth_error"

"""Provider health: passive measurement of real calls, `provider.health.updated` on the
`providers` channel, and the active checks a worker runs (`checks.check_all`).
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from apix.providers import checks
from apix.providers.runtime import ProvidersRuntime
from tests.identity.factories import Account, new_org_admin
from tests.providers.factories import PROVIDERS, complete, new_provider
from tests.providers.fakes import FakeAnthropic, FakeOpenAI, error, hang, ok

EVENTS = "/api/v1/apix/channels/providers/events"


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


@pytest.fixture
def runtime(app: Any) -> ProvidersRuntime:
    state = app.state
    return ProvidersRuntime.create(
        state.settings, state.database, state.redis, state.gateway.broker
    )


async def _health(
    client: httpx.AsyncClient, admin: Account, provider: dict[str, Any]
) -> dict[str, Any]:
    response = await client.get(f"{PROVIDERS}/{provider['id']}", headers=admin.headers)
    assert response.status_code == 200, response.text
    return response.json()["health"]  # type: ignore[no-any-return]


async def _events(client: httpx.AsyncClient, admin: Account) -> list[dict[str, Any]]:
    response = await client.get(EVENTS, headers=admin.headers)
    assert response.status_code == 200, response.text
    return [e for e in response.json()["events"] if e["type"] == "provider.health.updated"]


async def test_real_calls_give_availability_error_rate_and_latency_percentiles(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    provider = await new_provider(client, admin, fake_openai)
    fake_openai.then(hang(1.0), ok(), ok(), error(400), error(401))
    for _ in range(5):
        await client.post(f"{PROVIDERS}/{provider['id']}/test", headers=admin.headers)
    health = await _health(client, admin, provider)
    assert health["samples"] == 5
    assert health["availability"] == 0.6
    assert health["error_rate"] == 0.4
    assert health["last_error"] == "provider_auth_error"
    latency = health["latency_ms"]
    assert latency["p50"] < 1000 <= latency["p99"]
    assert latency["p50"] <= latency["p95"] <= latency["p99"]
    # 40% errors, but none that opens the circuit: degraded, not unhealthy.
    assert health["status"] == "degraded"
    assert health["circuit"] == "closed"


async def test_status_changes_are_published_on_the_providers_channel(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, fake_openai_2: FakeOpenAI
) -> None:
    fallback = await new_provider(client, admin, fake_openai_2, name="spare")
    provider = await new_provider(
        client, admin, fake_openai, name="main", is_primary=True, fallback_ids=[fallback["id"]]
    )
    fake_openai.then(ok(), error(500), error(500), error(500))
    assert (await complete(client, admin, policy="fallback")).status_code == 200
    assert (await complete(client, admin, policy="fallback")).status_code == 200
    events = [e for e in await _events(client, admin) if e["data"]["provider_id"] == provider["id"]]
    assert [(e["data"]["previous_status"], e["data"]["status"]) for e in events] == [
        ("healthy", "degraded"),
        ("degraded", "unhealthy"),
    ]
    last = events[-1]["data"]
    assert last["provider_name"] == "main"
    assert last["circuit"] == "open"
    assert last["consecutive_failures"] == 3
    # Another organisation's channel carries none of it.
    other = await new_org_admin(client)
    assert await _events(client, other) == []


async def test_active_checks_list_models_and_move_the_circuit(
    client: httpx.AsyncClient,
    admin: Account,
    runtime: ProvidersRuntime,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
) -> None:
    gpt = await new_provider(client, admin, fake_openai, name="gpt")
    claude = await new_provider(client, admin, fake_anthropic, kind="anthropic", name="claude")
    org_id = uuid.UUID(admin.org_id)

    results = await checks.check_all(runtime, org_ids=[org_id])
    assert {(str(r.provider_id), r.ok) for r in results} == {
        (gpt["id"], True),
        (claude["id"], True),
    }
    assert [r["path"] for r in fake_openai.requests] == ["/v1/models"]
    assert [r["path"] for r in fake_anthropic.requests] == ["/v1/models"]
    health = await _health(client, admin, gpt)
    assert health["status"] == "healthy"
    assert health["checked_at"] is not None
    assert health["check_latency_ms"] > 0
    assert health["samples"] == 0  # checks stay out of the call statistics

    # breaker_failures = 3 in these tests: three failed checks open the circuit.
    fake_openai.default = error(503)
    for _ in range(3):
        (result,) = [
            r
            for r in await checks.check_all(runtime, org_ids=[org_id])
            if r.provider_id == uuid.UUID(gpt["id"])
        ]
        assert result.ok is False
        assert result.error == "provider_unavailable"
    health = await _health(client, admin, gpt)
    assert (health["status"], health["circuit"]) == ("unhealthy", "open")
    assert health["last_error"] == "provider_unavailable"

    # A successful check closes it again at once.
    fake_openai.default = ok()
    await checks.check_all(runtime, org_ids=[org_id])
    health = await _health(client, admin, gpt)
    assert (health["status"], health["circuit"]) == ("healthy", "closed")


async def test_check_all_covers_every_active_organisation(
    client: httpx.AsyncClient, admin: Account, runtime: ProvidersRuntime, fake_openai: FakeOpenAI
) -> None:
    other = await new_org_admin(client)
    mine = await new_provider(client, admin, fake_openai)
    theirs = await new_provider(client, other, fake_openai)
    results = await checks.check_all(runtime)
    assert {str(r.provider_id) for r in results} >= {mine["id"], theirs["id"]}


async def test_a_deleted_providers_health_is_forgotten(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI, app: Any
) -> None:
    provider = await new_provider(client, admin, fake_openai)
    await client.post(f"{PROVIDERS}/{provider['id']}/test", headers=admin.headers)
    redis: Redis = app.state.redis
    pattern = f"apix:prov:{{{admin.org_id}:{provider['id']}}}:*"
    assert [k async for k in redis.scan_iter(match=pattern)] != []
    await client.delete(f"{PROVIDERS}/{provider['id']}", headers=admin.headers)
    assert [k async for k in redis.scan_iter(match=pattern)] == []

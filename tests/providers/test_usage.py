"""Usage metering: tokens as the provider reported them, cost from the price table in force
(settings, overridden per organisation), rolled up per day, provider, agent and model.
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any

import httpx
import pytest

from apix.core.time import utcnow
from tests.identity.factories import Account, new_member, new_org_admin
from tests.providers.factories import PROVIDERS, complete, new_provider
from tests.providers.fakes import FakeAnthropic, FakeOpenAI, error, ok

USAGE = "/api/v1/usage"
PRICES = "/api/v1/usage/prices"


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


def _ok(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


async def test_usage_matches_what_the_providers_reported_and_costs_follow_the_prices(
    client: httpx.AsyncClient,
    admin: Account,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
) -> None:
    gpt = await new_provider(client, admin, fake_openai, name="gpt")
    claude = await new_provider(client, admin, fake_anthropic, kind="anthropic", name="claude")
    fake_openai.then(
        ok("one", input_tokens=12, output_tokens=5),
        ok("two", input_tokens=100, output_tokens=50),
        error(400),
    )
    fake_anthropic.then(ok("three", input_tokens=1000, output_tokens=2000))
    results = [
        _ok(await complete(client, admin, provider_id=gpt["id"])),
        _ok(await complete(client, admin, provider_id=gpt["id"])),
        _ok(await complete(client, admin, provider_id=claude["id"])),
    ]
    assert (await complete(client, admin, provider_id=gpt["id"])).status_code == 400
    # Settings' prices in these tests: fake-gpt 2/8, fake-claude 3/15 USD per million tokens.
    assert results[0]["cost_usd"] == pytest.approx((12 * 2 + 5 * 8) / 1e6)
    assert results[2]["cost_usd"] == pytest.approx((1000 * 3 + 2000 * 15) / 1e6)

    one = _ok(await client.get(f"{PROVIDERS}/{gpt['id']}/usage", headers=admin.headers))
    today = utcnow().date().isoformat()
    assert one["group_by"] == ["day", "model"]
    assert one["rows"] == [
        {
            "day": today,
            "provider_id": None,
            "provider_name": None,
            "agent_id": None,
            "model": "fake-gpt",
            "calls": 2,
            "failed_calls": 1,
            "input_tokens": 112,
            "output_tokens": 55,
            "cost_usd": pytest.approx((112 * 2 + 55 * 8) / 1e6),
        }
    ]

    everything = _ok(await client.get(USAGE, headers=admin.headers))
    assert everything["group_by"] == ["day", "provider", "agent", "model"]
    by_name = {row["provider_name"]: row for row in everything["rows"]}
    assert set(by_name) == {"gpt", "claude"}
    assert by_name["claude"]["input_tokens"] == 1000
    assert by_name["claude"]["output_tokens"] == 2000
    assert by_name["claude"]["agent_id"] is None
    assert everything["totals"] == {
        "calls": 3,
        "failed_calls": 1,
        "input_tokens": 1112,
        "output_tokens": 2055,
        "cost_usd": pytest.approx((112 * 2 + 55 * 8 + 1000 * 3 + 2000 * 15) / 1e6),
    }
    per_model = _ok(await client.get(USAGE, headers=admin.headers, params={"group_by": ["model"]}))
    assert [(r["model"], r["calls"]) for r in per_model["rows"]] == [
        ("fake-claude", 1),
        ("fake-gpt", 2),
    ]
    only_claude = _ok(
        await client.get(USAGE, headers=admin.headers, params={"model": "fake-claude"})
    )
    assert only_claude["totals"]["calls"] == 1


async def test_an_organisation_overrides_a_price_for_its_own_calls_only(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    other = await new_org_admin(client)
    provider = await new_provider(client, admin, fake_openai)
    fake_openai.default = ok(input_tokens=1_000_000, output_tokens=1_000_000)

    put = await client.put(
        f"{PRICES}/fake-gpt",
        headers=admin.headers,
        json={"input_per_mtok": 1, "output_per_mtok": 0.5},
    )
    assert _ok(put) == {
        "model": "fake-gpt",
        "input_per_mtok": 1.0,
        "output_per_mtok": 0.5,
        "source": "organization",
    }
    result = _ok(await complete(client, admin, provider_id=provider["id"]))
    assert result["cost_usd"] == pytest.approx(1.5)

    mine = {p["model"]: p for p in _ok(await client.get(PRICES, headers=admin.headers))}
    theirs = {p["model"]: p for p in _ok(await client.get(PRICES, headers=other.headers))}
    assert mine["fake-gpt"]["source"] == "organization"
    assert theirs["fake-gpt"] == {
        "model": "fake-gpt",
        "input_per_mtok": 2.0,
        "output_per_mtok": 8.0,
        "source": "settings",
    }

    deleted = await client.delete(f"{PRICES}/fake-gpt", headers=admin.headers)
    assert deleted.status_code == 204
    again = await client.delete(f"{PRICES}/fake-gpt", headers=admin.headers)
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "price_not_found"
    result = _ok(await complete(client, admin, provider_id=provider["id"]))
    assert result["cost_usd"] == pytest.approx(10.0)  # the settings' 2 + 8 again


async def test_prices_match_model_prefixes_and_names_with_slashes(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    provider = await new_provider(client, admin, fake_openai, default_model="meta-llama/Llama-3-8b")
    fake_openai.default = ok(input_tokens=1_000_000, output_tokens=0)
    put = await client.put(
        f"{PRICES}/meta-llama/Llama-3",
        headers=admin.headers,
        json={"input_per_mtok": 0.2, "output_per_mtok": 0.2},
    )
    assert _ok(put)["model"] == "meta-llama/Llama-3"
    result = _ok(await complete(client, admin, provider_id=provider["id"]))
    assert result["model"] == "meta-llama/Llama-3-8b"
    assert result["cost_usd"] == pytest.approx(0.2)


async def test_a_model_with_no_price_costs_nothing(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    provider = await new_provider(client, admin, fake_openai, default_model="home-made")
    result = _ok(await complete(client, admin, provider_id=provider["id"]))
    assert result["cost_usd"] == 0
    assert result["usage"]["input_tokens"] == 11


async def test_usage_is_per_organisation(
    client: httpx.AsyncClient, admin: Account, fake_openai: FakeOpenAI
) -> None:
    provider = await new_provider(client, admin, fake_openai)
    _ok(await complete(client, admin, provider_id=provider["id"]))
    other = await new_org_admin(client)
    theirs = _ok(await client.get(USAGE, headers=other.headers))
    assert theirs["rows"] == []
    assert theirs["totals"]["calls"] == 0
    response = await client.get(f"{PROVIDERS}/{provider['id']}/usage", headers=other.headers)
    assert response.status_code == 404


async def test_developers_read_usage_and_prices_but_only_admins_set_prices(
    client: httpx.AsyncClient, admin: Account
) -> None:
    developer = await new_member(client, admin, "DEVELOPER")
    assert (await client.get(USAGE, headers=developer.headers)).status_code == 200
    assert (await client.get(PRICES, headers=developer.headers)).status_code == 200
    body = {"input_per_mtok": 1, "output_per_mtok": 1}
    assert (
        await client.put(f"{PRICES}/x", headers=developer.headers, json=body)
    ).status_code == 403
    assert (await client.delete(f"{PRICES}/x", headers=developer.headers)).status_code == 403


@pytest.mark.parametrize(
    ("params", "status"),
    [
        ({"since": "2026-02-01", "until": "2026-01-01"}, 400),
        ({"since": "2020-01-01", "until": "2026-01-01"}, 400),
        ({"since": "yesterday"}, 422),
        ({"group_by": "week"}, 422),
        ({"provider_id": "nope"}, 422),
    ],
)
async def test_bad_usage_queries_get_typed_errors(
    client: httpx.AsyncClient, admin: Account, params: dict[str, str], status: int
) -> None:
    response = await client.get(USAGE, headers=admin.headers, params=params)
    assert response.status_code == status, response.text
    assert "error" in response.json()


@pytest.mark.parametrize(
    "body",
    [
        {"input_per_mtok": -1, "output_per_mtok": 1},
        {"input_per_mtok": 1},
        {"input_per_mtok": "free", "output_per_mtok": 1},
        {"input_per_mtok": 1, "output_per_mtok": 1, "currency": "EUR"},
    ],
)
async def test_bad_prices_get_422(
    client: httpx.AsyncClient, admin: Account, body: dict[str, Any]
) -> None:
    response = await client.put(f"{PRICES}/gpt-4o", headers=admin.headers, json=body)
    assert response.status_code == 422, response.text


async def test_a_usage_window_can_be_chosen(client: httpx.AsyncClient, admin: Account) -> None:
    until = date(2026, 1, 31)
    report = _ok(
        await client.get(
            USAGE,
            headers=admin.headers,
            params={"since": (until - timedelta(days=6)).isoformat(), "until": until.isoformat()},
        )
    )
    assert (report["since"], report["until"]) == ("2026-01-25", "2026-01-31")
    default = _ok(await client.get(USAGE, headers=admin.headers))
    assert date.fromisoformat(default["until"]) - date.fromisoformat(default["since"]) == timedelta(
        days=29
    )

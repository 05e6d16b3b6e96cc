"""Agent test fixtures: nodes that run agent runs in-process, and local fake LLM servers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from apix.config import ProvidersSettings, Settings, WorkerSettings
from tests.conftest import Servers, make_settings
from tests.identity.factories import Account
from tests.providers.conftest import PRICES
from tests.providers.factories import new_provider
from tests.providers.fakes import FakeOpenAI, Send, running


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(
        servers,
        worker=WorkerSettings(embedded=True, archive=False, run_claim_ms=1500),
        providers=ProvidersSettings(
            prices=PRICES,
            retry_attempts=2,
            retry_initial_s=0.01,
            retry_max_s=0.02,
            breaker_failures=50,
        ),
    )


@dataclass
class SlowOpenAI(FakeOpenAI):
    """The fake OpenAI server, sending each streamed chunk ``delay_s`` apart."""

    delay_s: float = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Send) -> None:
        async def paced(message: dict[str, Any]) -> None:
            if message.get("more_body") and self.delay_s:
                await asyncio.sleep(self.delay_s)
            await send(message)

        await super().__call__(scope, receive, paced)


@pytest.fixture
async def model() -> AsyncIterator[SlowOpenAI]:
    async with running(SlowOpenAI()) as server:
        yield server


@pytest.fixture
async def backup_model() -> AsyncIterator[SlowOpenAI]:
    async with running(SlowOpenAI()) as server:
        yield server


async def new_agent(
    client: httpx.AsyncClient,
    account: Account,
    model: FakeOpenAI,
    *,
    publish: bool = True,
    **fields: Any,
) -> dict[str, Any]:
    """A published agent on a new primary provider served by ``model``."""
    provider = await new_provider(client, account, model, is_primary=True)
    body = {
        "name": "Helper",
        "slug": f"helper-{provider['id'][:8]}",
        "provider_id": provider["id"],
        "system_prompt": "You are terse.",
        **fields,
    }
    response = await client.post("/api/v1/agents", headers=account.headers, json=body)
    assert response.status_code == 201, response.text
    agent: dict[str, Any] = response.json()
    if publish:
        published = await client.post(
            f"/api/v1/agents/{agent['id']}/publish", headers=account.headers
        )
        assert published.status_code == 201, published.text
    agent["provider"] = provider
    return agent


async def wait_run(
    client: httpx.AsyncClient, account: Account, run_id: str, timeout: float = 15.0
) -> dict[str, Any]:
    """The run once it has ended."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        run: dict[str, Any] = (
            await client.get(f"/api/v1/runs/{run_id}", headers=account.headers)
        ).json()
        if run["status"] in ("completed", "failed", "cancelled"):
            return run
        assert asyncio.get_running_loop().time() < deadline, run
        await asyncio.sleep(0.05)

"""Provider test fixtures: fast retries and breaker, and local fake LLM servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from apix.config import ModelPrice, ProvidersSettings, Settings
from tests.conftest import Servers, make_settings
from tests.providers.fakes import FakeAnthropic, FakeOpenAI, running

# Prices the usage tests compute costs from (USD per million tokens).
PRICES = {
    "fake-gpt": ModelPrice(input_per_mtok=2.0, output_per_mtok=8.0),
    "fake-claude": ModelPrice(input_per_mtok=3.0, output_per_mtok=15.0),
}


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(
        servers,
        providers=ProvidersSettings(
            prices=PRICES,
            retry_attempts=3,
            retry_initial_s=0.01,
            retry_max_s=0.02,
            breaker_failures=3,
            breaker_open_s=1.5,
            health_window=50,
        ),
    )


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with running(FakeOpenAI()) as server:
        yield server


@pytest.fixture
async def fake_openai_2() -> AsyncIterator[FakeOpenAI]:
    async with running(FakeOpenAI()) as server:
        yield server


@pytest.fixture
async def fake_anthropic() -> AsyncIterator[FakeAnthropic]:
    async with running(FakeAnthropic()) as server:
        yield server

"""Contract tests of `/api/v1/providers` and `/api/v1/usage` generated from the OpenAPI schema.

Same harness as the auth and admin contract tests (`tests/identity/test_schemathesis.py`):
every operation, with schema-valid and schema-violating requests, as an ORG_ADMIN; never a
5xx, documented statuses and bodies. The provider is a local OpenAI-compatible server run
in a thread of its own (schemathesis blocks the test's event loop).
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import schemathesis
from schemathesis import GenerationMode
from schemathesis.python import asgi

from apix.app import create_app
from apix.config import Settings
from tests.identity.factories import new_org_admin
from tests.identity.test_schemathesis import EXAMPLES_PER_MODE, EXAMPLES_WITH_REAL_IDS, _fuzz
from tests.providers.factories import new_provider
from tests.providers.fakes import FakeOpenAI, running_in_thread

PATHS = r"^/api/v1/(providers|usage)"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with running_in_thread(FakeOpenAI()) as server:
        yield server


@pytest.fixture
async def fuzz_setup(
    client: httpx.AsyncClient, fake: FakeOpenAI
) -> tuple[dict[str, str], dict[str, str]]:
    admin = await new_org_admin(client)
    spare = await new_provider(client, admin, fake, name="spare")
    provider = await new_provider(client, admin, fake, fallback_ids=[spare["id"]])
    return admin.headers, {"provider_id": provider["id"], "model": "gpt-4o"}


def test_provider_and_usage_operations_conform_to_the_schema(
    settings: Settings, fuzz_setup: tuple[dict[str, str], dict[str, str]]
) -> None:
    headers, path_ids = fuzz_setup
    app = create_app(settings)
    failures: list[str] = []
    try:
        schema = schemathesis.openapi.from_asgi("/api/openapi.json", app).include(path_regex=PATHS)
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {operation.label for operation in operations}
        assert {
            "POST /api/v1/providers",
            "PATCH /api/v1/providers/{provider_id}",
            "POST /api/v1/providers/{provider_id}/test",
            "POST /api/v1/providers/completions",
            "GET /api/v1/usage",
            "PUT /api/v1/usage/prices/{model}",
        } <= labels, labels
        # Calls first, while every provider still points at the local server: the writes
        # fuzzed later make providers that point elsewhere (and would answer 503).
        operations.sort(key=lambda op: not op.path.endswith(("/completions", "/test")))
        for operation in operations:
            if operation.method.upper() == "DELETE" and "provider_id" in operation.path:
                continue  # deleting the one real provider would leave the rest at 404
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                failures += _fuzz(operation, mode, headers, max_examples=EXAMPLES_PER_MODE)
            known = {k: v for k, v in path_ids.items() if f"{{{k}}}" in operation.path}
            if known:
                failures += _fuzz(
                    operation,
                    GenerationMode.POSITIVE,
                    headers,
                    max_examples=EXAMPLES_WITH_REAL_IDS,
                    path_parameters=known,
                )
    finally:
        asgi.shutdown_lifespans()
    assert not failures, f"{len(failures)} operation(s) failed:\n\n" + "\n\n".join(failures)

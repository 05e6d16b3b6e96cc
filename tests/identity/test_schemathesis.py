"""Property-based contract tests of the auth and admin API, generated from its OpenAPI schema.

schemathesis (v4) generates requests for every `/api/v1/auth/…` and `/api/v1/admin/…`
operation, schema-valid and schema-violating ones, sends them with an ORG_ADMIN's bearer
token (a SUPER_ADMIN's for the platform routes) and checks each response: never a 5xx,
a documented status and content type, a body that matches the response schema, and
schema-violating requests refused.

schemathesis drives an ASGI app from its own event loop thread, while the fixtures'
database and Redis clients belong to the test session's loop; so the accounts are made
through the usual `client` fixture and the fuzzing runs against a second app built from
the same settings (same database, Redis and signing keys), started and stopped here.
Each operation gets its own login session, so an operation that ends one (logout, a
session revocation) cannot hide the others behind 401s; operations with path parameters
also run with ids of real objects, so they are exercised beyond 404.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase
from hypothesis.errors import Unsatisfiable
from schemathesis import Case, GenerationMode
from schemathesis.python import asgi

from apix.app import create_app
from apix.config import Settings
from apix.identity.runtime import IdentityRuntime
from tests.identity.factories import (
    bearer,
    login,
    new_api_key,
    new_member,
    new_org_admin,
    new_super_admin,
)

PATHS = r"^/api/v1/(auth|admin)/"
EXAMPLES_PER_MODE = 12
EXAMPLES_WITH_REAL_IDS = 6

CHECKS = [
    schemathesis.checks.not_a_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_headers_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.negative_data_rejection,
]


@dataclass
class FuzzAccounts:
    admin_email: str
    platform_token: str
    path_ids: dict[str, str]
    tokens: list[str] = field(default_factory=list)

    def headers_for(self, operation: Any) -> dict[str, str]:
        if operation.path.startswith("/api/v1/admin/organizations"):
            return bearer(self.platform_token)
        # A session of its own while they last (more routes than sessions: share the last).
        return bearer(self.tokens.pop() if len(self.tokens) > 1 else self.tokens[0])


@pytest.fixture
async def fuzz_accounts(client: httpx.AsyncClient, runtime: IdentityRuntime) -> FuzzAccounts:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    key = await new_api_key(client, admin, role="VIEWER")
    invitation = await client.post(
        "/api/v1/admin/invitations", headers=admin.headers, json={"email": "fuzz@example.com"}
    )
    assert invitation.status_code == 201, invitation.text
    other_org = await new_org_admin(client)
    root = await new_super_admin(client, runtime)
    spare = await login(client, admin.email)
    sessions = await client.get("/api/v1/admin/sessions", headers=bearer(spare["access_token"]))
    spare_session = next(s["id"] for s in sessions.json() if s["current"])
    tokens = [(await login(client, admin.email))["access_token"] for _ in range(32)]
    return FuzzAccounts(
        admin_email=admin.email,
        platform_token=root["access_token"],
        path_ids={
            "user_id": viewer.user_id,
            "invitation_id": invitation.json()["id"],
            "key_id": key["id"],
            "session_id": spare_session,
            "org_id": other_org.org_id,
        },
        tokens=tokens,
    )


def _fuzz(
    operation: Any,
    mode: GenerationMode,
    headers: dict[str, str],
    *,
    max_examples: int,
    path_parameters: dict[str, str] | None = None,
) -> list[str]:
    """Failures found for one operation in one generation mode (empty when none)."""
    rejection = operation.schema.config.checks.negative_data_rejection
    if "413" not in rejection.expected_statuses:
        # Invalid data may also be too much of it: a body past `server.max_body_bytes` is
        # refused before anyone reads it, with 413 (e.g. 100 messages of 50,001 characters).
        rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    strategy = operation.as_strategy(generation_mode=mode, path_parameters=path_parameters)

    @hypothesis.given(case=strategy)
    @hypothesis.settings(
        max_examples=max_examples,
        deadline=None,
        database=None,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Case) -> None:
        case.call_and_validate(headers=headers, checks=CHECKS)

    label = f"{operation.label} [{mode.value}{', real ids' if path_parameters else ''}]"
    try:
        run()
    except Unsatisfiable:
        if mode is GenerationMode.NEGATIVE:
            return []  # nothing in this operation can be made invalid (no body, no params)
        return [f"{label}: no positive example could be generated"]
    except (Exception, BaseExceptionGroup) as failure:
        return [f"{label}:\n{failure}"]
    return []


def test_auth_and_admin_operations_conform_to_the_schema(
    settings: Settings, fuzz_accounts: FuzzAccounts
) -> None:
    app = create_app(settings)
    failures: list[str] = []
    try:
        schema = schemathesis.openapi.from_asgi("/api/openapi.json", app).include(path_regex=PATHS)
        operations = [result.ok() for result in schema.get_all_operations()]
        labels = {operation.label for operation in operations}
        # The filter caught the routes it is meant to (and nothing silently vanished).
        assert len(operations) >= 25, labels
        assert {
            "POST /api/v1/auth/login",
            "PATCH /api/v1/admin/members/{user_id}",
            "POST /api/v1/admin/api-keys",
            "POST /api/v1/admin/organizations/{org_id}/suspend",
        } <= labels
        for operation in operations:
            headers = fuzz_accounts.headers_for(operation)
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                failures += _fuzz(operation, mode, headers, max_examples=EXAMPLES_PER_MODE)
            known = {
                name: value
                for name, value in fuzz_accounts.path_ids.items()
                if f"{{{name}}}" in operation.path
            }
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

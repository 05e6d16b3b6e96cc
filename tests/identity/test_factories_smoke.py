"""The factories every identity test builds on work end to end."""

from __future__ import annotations

import httpx

from tests.identity.factories import new_api_key, new_member, new_org_admin, new_super_admin


async def test_factories_make_an_org_with_members_keys_and_a_super_admin(
    client: httpx.AsyncClient, runtime: object
) -> None:
    admin = await new_org_admin(client)
    assert admin.role == "ORG_ADMIN"
    dev = await new_member(client, admin, "DEVELOPER")
    assert dev.role == "DEVELOPER"
    assert dev.org_id == admin.org_id
    key = await new_api_key(client, admin, role="VIEWER")
    assert key["key"].startswith("apx_")
    root = await new_super_admin(client, runtime)  # type: ignore[arg-type]
    assert root["role"] == "SUPER_ADMIN"

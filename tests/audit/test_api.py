"""`/api/v1/audit`: who may read and write the trail, filters, pages, summaries, reports."""

from __future__ import annotations

import csv
import io
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from apix.identity.runtime import IdentityRuntime
from tests.audit.helpers import chain_rows, tamper
from tests.identity.factories import (
    Account,
    bearer,
    new_api_key,
    new_member,
    new_org_admin,
    new_super_admin,
)

AUDIT = "/api/v1/audit"
READS = ["/logs", "/verify", "/summary", "/compliance-report", "/retention"]


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


@pytest.fixture
async def other(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


async def _get(client: httpx.AsyncClient, who: Account, path: str, **params: Any) -> Any:
    response = await client.get(f"{AUDIT}{path}", headers=who.headers, params=params)
    assert response.status_code == 200, response.text
    return response.json()


async def _event(client: httpx.AsyncClient, headers: dict[str, str], **body: Any) -> httpx.Response:
    return await client.post(f"{AUDIT}/log-event", headers=headers, json=body)


# --- who may call what ------------------------------------------------------------------


@pytest.mark.parametrize("path", [*READS, "/log-event"])
async def test_anonymous_callers_are_refused(client: httpx.AsyncClient, path: str) -> None:
    method = "POST" if path == "/log-event" else "GET"
    response = await client.request(method, f"{AUDIT}{path}", json={"action": "a.b"})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"


@pytest.mark.parametrize("role", ["VIEWER", "DEVELOPER"])
@pytest.mark.parametrize("path", READS)
async def test_roles_below_org_admin_cannot_read_the_trail(
    client: httpx.AsyncClient, admin: Account, role: str, path: str
) -> None:
    member = await new_member(client, admin, role)
    response = await client.get(f"{AUDIT}{path}", headers=member.headers)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden"


async def test_only_an_org_admin_sets_the_retention(
    client: httpx.AsyncClient, admin: Account
) -> None:
    developer = await new_member(client, admin, "DEVELOPER")
    body = {"retention_days": 30}
    refused = await client.put(f"{AUDIT}/retention", headers=developer.headers, json=body)
    assert refused.status_code == 403
    accepted = await client.put(f"{AUDIT}/retention", headers=admin.headers, json=body)
    assert accepted.status_code == 200, accepted.text


async def test_an_api_key_with_the_role_reads_the_trail(
    client: httpx.AsyncClient, admin: Account
) -> None:
    key = await new_api_key(client, admin, role="ORG_ADMIN")
    viewer_key = await new_api_key(client, admin, role="VIEWER")
    ok = await client.get(f"{AUDIT}/logs", headers={"X-API-Key": key["key"]})
    assert ok.status_code == 200, ok.text
    refused = await client.get(f"{AUDIT}/logs", headers={"X-API-Key": viewer_key["key"]})
    assert refused.status_code == 403


# --- tenants ----------------------------------------------------------------------------


async def test_another_tenants_trail_is_invisible(
    client: httpx.AsyncClient, admin: Account, other: Account
) -> None:
    secret_action = "theirs.secret_event"
    assert (await _event(client, other.headers, action=secret_action)).status_code == 201
    logs = await _get(client, admin, "/logs", limit=500)
    assert {item["org_id"] for item in logs["items"]} == {admin.org_id}
    assert secret_action not in {item["action"] for item in logs["items"]}
    for path in READS:
        response = await client.get(
            f"{AUDIT}{path}", headers=admin.headers, params={"org_id": other.org_id}
        )
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    summary = await _get(client, admin, "/summary")
    assert secret_action not in {a["action"] for a in summary["by_action"]}


async def test_a_super_admin_reads_any_organisation_and_the_platform(
    client: httpx.AsyncClient, runtime: IdentityRuntime, admin: Account
) -> None:
    root = await new_super_admin(client, runtime)
    headers = bearer(root["access_token"])
    # A failed login for an unknown email: a platform event.
    await client.post(
        "/api/v1/auth/login", json={"email": "nobody@example.com", "password": "wrong password"}
    )
    platform = await client.get(f"{AUDIT}/logs", headers=headers)
    assert platform.status_code == 200, platform.text
    assert platform.json()["items"]
    assert {i["org_id"] for i in platform.json()["items"]} == {None}
    theirs = await client.get(f"{AUDIT}/logs", headers=headers, params={"org_id": admin.org_id})
    assert theirs.status_code == 200
    assert {i["org_id"] for i in theirs.json()["items"]} == {admin.org_id}
    verdict = await client.get(f"{AUDIT}/verify", headers=headers)
    assert verdict.json()["ok"]
    assert verdict.json()["org_id"] is None
    unknown = await client.get(
        f"{AUDIT}/logs", headers=headers, params={"org_id": str(uuid.uuid4())}
    )
    assert unknown.status_code == 404


# --- logs -------------------------------------------------------------------------------


async def test_logs_filter_and_page(client: httpx.AsyncClient, admin: Account) -> None:
    key = await new_api_key(client, admin, role="DEVELOPER")
    key_headers = {"X-API-Key": key["key"]}
    for i in range(5):
        response = await _event(
            client,
            key_headers,
            action=f"crm.contact.{'synced' if i % 2 else 'failed'}",
            target_type="contact",
            target_id=f"c-{i}",
            outcome="success" if i % 2 else "failure",
        )
        assert response.status_code == 201, response.text

    everything = await _get(client, admin, "/logs", limit=500)
    seqs = [item["seq"] for item in everything["items"]]
    assert seqs == sorted(seqs, reverse=True)

    by_actor = await _get(client, admin, "/logs", actor=key["id"])
    assert len(by_actor["items"]) == 5
    assert {i["actor_api_key_id"] for i in by_actor["items"]} == {key["id"]}
    by_prefix = await _get(client, admin, "/logs", action="crm.*")
    assert len(by_prefix["items"]) == 5
    exact = await _get(client, admin, "/logs", action="crm.contact.failed")
    assert [i["target_id"] for i in exact["items"]] == ["c-4", "c-2", "c-0"]
    failures = await _get(client, admin, "/logs", outcome="failure", source="integration")
    assert len(failures["items"]) == 3
    one = await _get(client, admin, "/logs", target_type="contact", target_id="c-3")
    assert [i["target_id"] for i in one["items"]] == ["c-3"]
    login = await _get(client, admin, "/logs", action="auth.login", source="app")
    assert login["items"]
    assert login["items"][0]["actor_user_id"] == admin.user_id

    newest = everything["items"][0]["created_at"]
    later = await _get(client, admin, "/logs", **{"from": newest})
    assert [i["seq"] for i in later["items"]] == [seqs[0]]
    earlier = await _get(client, admin, "/logs", to=newest)
    assert [i["seq"] for i in earlier["items"]] == seqs[1:]

    pages: list[int] = []
    cursor: str | None = None
    while True:
        params: dict[str, Any] = {"limit": 2}
        if cursor:
            params["cursor"] = cursor
        page = await _get(client, admin, "/logs", **params)
        pages.extend(item["seq"] for item in page["items"])
        cursor = page["next"]
        if cursor is None:
            break
    assert pages == seqs


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"limit": 0}, 422, "validation_error"),
        ({"limit": 501}, 422, "validation_error"),
        ({"from": "yesterday"}, 422, "validation_error"),
        ({"actor": "not-a-uuid"}, 422, "validation_error"),
        ({"outcome": "maybe"}, 422, "validation_error"),
        ({"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, 422, "invalid_time_range"),
        ({"cursor": "not a cursor"}, 400, "bad_request"),
    ],
)
async def test_bad_log_parameters_get_typed_errors(
    client: httpx.AsyncClient, admin: Account, params: dict[str, Any], status: int, code: str
) -> None:
    response = await client.get(f"{AUDIT}/logs", headers=admin.headers, params=params)
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


# --- log-event --------------------------------------------------------------------------


async def test_an_integration_records_its_own_event(
    client: httpx.AsyncClient, admin: Account
) -> None:
    key = await new_api_key(client, admin, role="VIEWER")
    response = await _event(
        client,
        {"X-API-Key": key["key"], "User-Agent": "crm-sync/1.0"},
        action="crm.contact.exported",
        target_type="contact",
        target_id="42",
        details={"rows": 10, "fields": ["name", "email"]},
    )
    assert response.status_code == 201, response.text
    event = response.json()
    assert event["source"] == "integration"
    assert event["actor_api_key_id"] == key["id"]
    assert event["actor_user_id"] is None
    assert event["org_id"] == admin.org_id
    assert event["user_agent"] == "crm-sync/1.0"
    assert event["details"] == {"rows": 10, "fields": ["name", "email"]}
    as_user = await _event(client, admin.headers, action="deploy.finished")
    assert as_user.status_code == 201
    assert as_user.json()["actor_user_id"] == admin.user_id
    assert as_user.json()["seq"] == event["seq"] + 1
    assert as_user.json()["prev_hash"] == event["hash"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({}, "validation_error"),
        ({"action": "Not Dotted!"}, "validation_error"),
        ({"action": "a" * 101}, "validation_error"),
        ({"action": "a.b", "outcome": "great"}, "validation_error"),
        ({"action": "a.b", "unknown": 1}, "validation_error"),
        ({"action": "a.b", "details": {"big": "x" * 9000}}, "validation_error"),
        (
            {"action": "a.b", "details": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}},
            "validation_error",
        ),
        ({"action": "a.b", "details": {"nul": "\x00"}}, "validation_error"),
        ({"action": "a.b", "details": {"n": 2**70}}, "validation_error"),
        ({"action": "a.b", "details": []}, "validation_error"),
        ({"action": "a.b", "target_id": "line\nbreak"}, "validation_error"),
        ({"action": "audit.checkpoint"}, "reserved_action"),
        ({"action": "audit.exported"}, "reserved_action"),
    ],
)
async def test_bad_events_are_refused(
    client: httpx.AsyncClient, admin: Account, body: dict[str, Any], code: str
) -> None:
    response = await _event(client, admin.headers, **body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == code


# --- verify -----------------------------------------------------------------------------


async def test_verify_reports_the_tampered_row(
    client: httpx.AsyncClient, admin: Account, owner_engine: AsyncEngine
) -> None:
    for i in range(3):
        await _event(client, admin.headers, action=f"step.n{i}")
    verdict = await _get(client, admin, "/verify")
    assert verdict["ok"] is True
    assert verdict["broken"] is None
    assert verdict["checked"] == verdict["last_seq"] >= 5
    org = uuid.UUID(admin.org_id)
    rows = await chain_rows(owner_engine, org)
    target = next(r for r in rows if r["action"] == "step.n1")
    await tamper(owner_engine, org, target["id"], "outcome", "failure")
    verdict = await _get(client, admin, "/verify")
    assert verdict["ok"] is False
    assert verdict["broken"]["seq"] == target["seq"]
    assert verdict["broken"]["id"] == str(target["id"])
    assert "changed" in verdict["broken"]["reason"]


# --- summary ----------------------------------------------------------------------------


async def test_summary_counts_by_action_actor_and_outcome(
    client: httpx.AsyncClient, admin: Account
) -> None:
    key = await new_api_key(client, admin, role="VIEWER")
    for _ in range(3):
        await _event(client, {"X-API-Key": key["key"]}, action="job.ran")
    await _event(client, {"X-API-Key": key["key"]}, action="job.ran", outcome="failure")
    summary = await _get(client, admin, "/summary")
    actions = {a["action"]: a["count"] for a in summary["by_action"]}
    assert actions["job.ran"] == 4
    assert actions["auth.login"] >= 1
    actors = {(a["actor_user_id"], a["actor_api_key_id"]): a["count"] for a in summary["by_actor"]}
    assert actors[(None, key["id"])] == 4
    assert summary["by_outcome"]["failure"] == 1
    assert summary["total"] == sum(actions.values())
    future = datetime.now(UTC) + timedelta(days=1)
    period = {"from": future.isoformat(), "to": (future + timedelta(days=1)).isoformat()}
    empty = await _get(client, admin, "/summary", **period)
    assert empty["total"] == 0
    assert empty["by_action"] == []


async def test_summary_refuses_an_inverted_period(
    client: httpx.AsyncClient, admin: Account
) -> None:
    response = await client.get(
        f"{AUDIT}/summary",
        headers=admin.headers,
        params={"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
    )
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_time_range"


# --- compliance report ------------------------------------------------------------------


async def _activity(client: httpx.AsyncClient, admin: Account) -> dict[str, Any]:
    """Logins, a refused call, a role change, an API key made and revoked, an export."""
    member = await new_member(client, admin, "VIEWER")
    # Identity records failed logins in the platform trail (see the super admin's report);
    # an integration reports an access it refused into the organisation's own.
    refused = await _event(client, member.headers, action="door.opened", outcome="denied")
    assert refused.status_code == 201, refused.text
    promoted = await client.patch(
        f"/api/v1/admin/members/{member.user_id}",
        headers=admin.headers,
        json={"role": "DEVELOPER"},
    )
    assert promoted.status_code == 200, promoted.text
    key = await new_api_key(client, admin, role="VIEWER")
    revoked = await client.delete(f"/api/v1/admin/api-keys/{key['id']}", headers=admin.headers)
    assert revoked.status_code == 204, revoked.text
    await _event(client, admin.headers, action="crm.contacts.exported", target_id="=1+2")
    return {"member": member, "key": key}


async def test_the_compliance_report_covers_what_an_auditor_asks_for(
    client: httpx.AsyncClient, admin: Account
) -> None:
    made = await _activity(client, admin)
    report = await _get(client, admin, "/compliance-report")
    actions = {
        name: [e["action"] for e in report[name]["events"]]
        for name in report
        if isinstance(report[name], dict) and "events" in report[name]
    }
    assert "auth.login" in actions["authentication"]
    assert actions["failed_access"] == ["door.opened"]
    assert "member.role_changed" in actions["privilege_changes"]
    assert "member.invited" in actions["privilege_changes"]
    assert actions["api_key_lifecycle"] == ["api_key.created", "api_key.revoked"]
    assert "crm.contacts.exported" in actions["data_exports"]
    for name in ("authentication", "failed_access", "privilege_changes", "data_exports"):
        assert report[name]["count"] == len(report[name]["events"])
        assert report[name]["truncated"] is False
    activity = {a["actor_user_id"]: a for a in report["per_user_activity"]}
    mine = activity[admin.user_id]
    assert mine["actions"]["member.role_changed"] == 1
    assert mine["events"] == sum(mine["actions"].values())
    assert made["member"].user_id in activity
    assert report["chain_verification"]["ok"] is True
    # Producing the report was itself recorded, as an export.
    exports = await _get(client, admin, "/logs", action="audit.exported")
    assert exports["items"][0]["details"]["format"] == "json"
    assert exports["items"][0]["actor_user_id"] == admin.user_id


async def test_the_compliance_report_as_csv(client: httpx.AsyncClient, admin: Account) -> None:
    await _activity(client, admin)
    response = await client.get(
        f"{AUDIT}/compliance-report", headers=admin.headers, params={"format": "csv"}
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/csv")
    assert "attachment" in response.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(response.text)))
    sections = {row["section"] for row in rows}
    assert {
        "authentication",
        "failed_access",
        "privilege_changes",
        "data_exports",
        "api_key_lifecycle",
        "per_user_activity",
        "chain_verification",
    } <= sections
    verdict = next(r for r in rows if r["section"] == "chain_verification")
    assert verdict["outcome"] == "success"
    exported = next(r for r in rows if r["action"] == "crm.contacts.exported")
    assert exported["target_id"] == "'=1+2"  # not a formula in a spreadsheet
    exports = await _get(client, admin, "/logs", action="audit.exported")
    assert exports["items"][0]["details"]["format"] == "csv"


async def test_the_platform_report_holds_failed_logins(
    client: httpx.AsyncClient, runtime: IdentityRuntime, admin: Account
) -> None:
    failed = await client.post(
        "/api/v1/auth/login", json={"email": admin.email, "password": "not the password"}
    )
    assert failed.status_code == 401
    root = await new_super_admin(client, runtime)
    response = await client.get(f"{AUDIT}/compliance-report", headers=bearer(root["access_token"]))
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["org_id"] is None
    failures = [e for e in report["failed_access"]["events"] if e["action"] == "auth.login"]
    assert [e["actor_user_id"] for e in failures] == [admin.user_id]
    assert failures[0] in report["authentication"]["events"]


@pytest.mark.parametrize(
    "params",
    [
        {"format": "xml"},
        {"from": "2026-02-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
        {"to": "soon"},
    ],
)
async def test_bad_report_parameters_get_422(
    client: httpx.AsyncClient, admin: Account, params: dict[str, str]
) -> None:
    response = await client.get(f"{AUDIT}/compliance-report", headers=admin.headers, params=params)
    assert response.status_code == 422, response.text


# --- retention --------------------------------------------------------------------------


async def test_retention_defaults_and_overrides(client: httpx.AsyncClient, admin: Account) -> None:
    default = await _get(client, admin, "/retention")
    assert default == {
        "org_id": admin.org_id,
        "retention_days": 365,
        "override": False,
        "default_days": 365,
    }
    url = f"{AUDIT}/retention"
    changed = await client.put(url, headers=admin.headers, json={"retention_days": 90})
    assert changed.json()["retention_days"] == 90
    assert changed.json()["override"] is True
    assert (await _get(client, admin, "/retention"))["retention_days"] == 90
    reset = await client.put(url, headers=admin.headers, json={"retention_days": None})
    assert reset.json()["override"] is False
    changes = await _get(client, admin, "/logs", action="audit.retention_changed")
    assert [c["details"]["to"] for c in changes["items"]] == [None, 90]
    for bad in ({"retention_days": 0}, {"retention_days": "long"}, {}, {"days": 3}):
        response = await client.put(url, headers=admin.headers, json=bad)
        assert response.status_code == 422, bad

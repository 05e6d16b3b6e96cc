"""Agents: drafts, published versions, validation, permissions; sessions and their events."""

from __future__ import annotations

from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.agents.conftest import SlowOpenAI, new_agent, wait_run
from tests.conftest import LiveServer
from tests.identity.factories import new_member, new_org_admin
from tests.providers.factories import new_provider
from tests.realtime.raw import connected

AGENTS = "/api/v1/agents"


async def test_editing_makes_a_draft_and_publishing_freezes_a_version(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model, publish=False, temperature=0.2)
    assert (agent["latest_version"], agent["draft_changed"]) == (None, True)
    not_yet = await client.post(
        f"{AGENTS}/{agent['id']}/runs", headers=admin.headers, json={"input": "x"}
    )
    assert not_yet.status_code == 409
    assert not_yet.json()["error"]["code"] == "agent_not_published"
    v1 = (await client.post(f"{AGENTS}/{agent['id']}/publish", headers=admin.headers)).json()
    assert (v1["version"], v1["config"]["temperature"]) == (1, 0.2)
    edited = (
        await client.patch(
            f"{AGENTS}/{agent['id']}",
            headers=admin.headers,
            json={"temperature": 1.5, "system_prompt": "Be verbose."},
        )
    ).json()
    assert (edited["draft"]["temperature"], edited["draft_changed"]) == (1.5, True)
    assert edited["latest_version"] == 1
    # Runs use the latest published version until the draft is published.
    run = (
        await client.post(
            f"{AGENTS}/{agent['id']}/runs", headers=admin.headers, json={"input": "a"}
        )
    ).json()
    assert run["version"] == 1
    await wait_run(client, admin, run["id"])
    assert model.calls[-1]["body"]["temperature"] == 0.2
    v2 = (await client.post(f"{AGENTS}/{agent['id']}/publish", headers=admin.headers)).json()
    assert v2["version"] == 2
    pinned = (
        await client.post(
            f"{AGENTS}/{agent['id']}/runs", headers=admin.headers, json={"input": "b", "version": 1}
        )
    ).json()
    await wait_run(client, admin, pinned["id"])
    assert model.calls[-1]["body"]["temperature"] == 0.2
    latest = (
        await client.post(
            f"{AGENTS}/{agent['id']}/runs", headers=admin.headers, json={"input": "c"}
        )
    ).json()
    await wait_run(client, admin, latest["id"])
    assert model.calls[-1]["body"]["temperature"] == 1.5
    assert model.calls[-1]["body"]["messages"][0]["content"] == "Be verbose."
    versions = (await client.get(f"{AGENTS}/{agent['id']}/versions", headers=admin.headers)).json()
    assert [v["version"] for v in versions] == [1, 2]
    runs = (await client.get(f"{AGENTS}/{agent['id']}/runs?limit=2", headers=admin.headers)).json()
    assert [r["id"] for r in runs["items"]] == [latest["id"], pinned["id"]]
    older = (
        await client.get(
            f"{AGENTS}/{agent['id']}/runs",
            headers=admin.headers,
            params={"cursor": runs["next_cursor"]},
        )
    ).json()
    assert [r["id"] for r in older["items"]] == [run["id"]]
    assert older["next_cursor"] is None


async def test_agent_validation_answers_typed_errors(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin, other = await new_org_admin(client), await new_org_admin(client)
    foreign = await new_provider(client, other, model)
    cases: list[tuple[dict[str, Any], int]] = [
        ({"name": "x", "slug": "Bad Slug"}, 422),
        ({"name": "x", "slug": "ok", "temperature": 3}, 422),
        ({"name": "x", "slug": "ok", "provider_id": foreign["id"]}, 400),
        ({"name": "x", "slug": "ok", "routing_policy": "fastest"}, 422),
        ({"name": "x", "slug": "ok", "unknown": 1}, 422),
    ]
    for body, status in cases:
        response = await client.post(AGENTS, headers=admin.headers, json=body)
        assert response.status_code == status, (body, response.text)
        assert set(response.json()["error"]) == {"code", "message", "details"}
    first = await client.post(AGENTS, headers=admin.headers, json={"name": "a", "slug": "dup"})
    assert first.status_code == 201
    again = await client.post(AGENTS, headers=admin.headers, json={"name": "b", "slug": "dup"})
    assert (again.status_code, again.json()["error"]["code"]) == (409, "slug_taken")


async def test_viewers_read_agents_but_cannot_change_or_run_them(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    viewer = await new_member(client, admin, "VIEWER")
    agent = await new_agent(client, admin, model)
    assert (await client.get(f"{AGENTS}/{agent['id']}", headers=viewer.headers)).status_code == 200
    for method, path, body in [
        ("POST", AGENTS, {"name": "v", "slug": "v"}),
        ("PATCH", f"{AGENTS}/{agent['id']}", {"name": "v"}),
        ("POST", f"{AGENTS}/{agent['id']}/publish", None),
        ("POST", f"{AGENTS}/{agent['id']}/runs", {"input": "x"}),
        ("DELETE", f"{AGENTS}/{agent['id']}", None),
    ]:
        response = await client.request(method, path, headers=viewer.headers, json=body)
        assert response.status_code == 403, (method, path, response.text)


async def test_session_changes_are_published_so_two_tabs_stay_in_step(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    session = (
        await client.post(
            "/api/v1/sessions",
            headers=admin.headers,
            json={"agent_id": agent["id"], "variables": {"lang": "en"}},
        )
    ).json()
    channel = f"sessions:{session['id']}"
    async with connected(live.ws, admin.access_token) as tab:
        await tab.subscribe(channel)
        updated = await client.patch(
            f"/api/v1/sessions/{session['id']}",
            headers=admin.headers,
            json={"variables": {"lang": "fr"}},
        )
        assert updated.json()["variables"] == {"lang": "fr"}
        (event,) = await tab.events(1)
        assert (event["type"], event["data"]["variables"]) == (
            "session.variables.updated",
            {"lang": "fr"},
        )
        run = (
            await client.post(
                f"{AGENTS}/{agent['id']}/runs",
                headers=admin.headers,
                json={"input": "Bonjour", "session_id": session["id"]},
            )
        ).json()
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "agent.run.completed":
            (event,) = await tab.events(1, timeout=10)
            events.append(event)
    created = [e["data"]["message"] for e in events if e["type"] == "session.message.created"]
    assert [(m["role"], m["run_id"]) for m in created] == [
        ("user", run["id"]),
        ("assistant", run["id"]),
    ]
    # The variables reach the model through the system prompt.
    assert "lang: fr" in model.calls[-1]["body"]["messages"][0]["content"]
    page = (
        await client.get(f"/api/v1/sessions/{session['id']}?limit=1", headers=admin.headers)
    ).json()
    assert [m["role"] for m in page["messages"]] == ["assistant"]
    older = (
        await client.get(
            f"/api/v1/sessions/{session['id']}",
            headers=admin.headers,
            params={"limit": 1, "before": page["next_cursor"]},
        )
    ).json()
    assert [m["content"] for m in older["messages"]] == ["Bonjour"]
    deleted = await client.delete(f"/api/v1/sessions/{session['id']}", headers=admin.headers)
    assert deleted.status_code == 204
    gone = await client.get(f"/api/v1/sessions/{session['id']}", headers=admin.headers)
    assert gone.status_code == 404
    assert (await client.get(f"/api/v1/runs/{run['id']}", headers=admin.headers)).json()[
        "session_id"
    ] is None


async def test_a_user_sees_only_their_own_sessions(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    developer = await new_member(client, admin, "DEVELOPER")
    agent = await new_agent(client, admin, model)
    mine = (
        await client.post(
            "/api/v1/sessions", headers=developer.headers, json={"agent_id": agent["id"]}
        )
    ).json()
    theirs = (
        await client.post("/api/v1/sessions", headers=admin.headers, json={"agent_id": agent["id"]})
    ).json()
    listed = (await client.get("/api/v1/sessions", headers=developer.headers)).json()
    assert [s["id"] for s in listed] == [mine["id"]]
    assert (
        await client.get(f"/api/v1/sessions/{theirs['id']}", headers=developer.headers)
    ).status_code == 404
    everyone = (await client.get("/api/v1/sessions", headers=admin.headers)).json()
    assert {s["id"] for s in everyone} == {mine["id"], theirs["id"]}


_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
# Two levels of nesting, spelled out (st.recursive warned spuriously under load).
_JSON = (
    _SCALAR
    | st.lists(_SCALAR, max_size=3)
    | st.dictionaries(st.text(max_size=8), _SCALAR | st.lists(_SCALAR, max_size=3), max_size=3)
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    body=st.dictionaries(
        st.sampled_from(
            [
                "name",
                "slug",
                "provider_id",
                "routing_policy",
                "temperature",
                "max_tokens",
                "tool_ids",
                "metadata",
                "x",
            ]
        ),
        _JSON,
        max_size=6,
    )
)
async def test_no_agent_body_yields_a_server_error(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> None:
    admin = await new_org_admin(client)
    created = await client.post(AGENTS, headers=admin.headers, json=body)
    assert created.status_code in (201, 400, 409, 422), created.text
    if created.status_code == 201:
        patched = await client.patch(
            f"{AGENTS}/{created.json()['id']}", headers=admin.headers, json=body
        )
        assert patched.status_code in (200, 400, 409, 422), patched.text


async def test_text_postgresql_cannot_store_is_refused_with_422(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    for body in (
        '{"input": "a\\u0000b"}',
        '{"input": "\\ud800"}',
        '{"input": "x", "metadata": {"k": "\\u0000"}}',
    ):
        response = await client.post(
            f"{AGENTS}/{agent['id']}/runs",
            headers={**admin.headers, "content-type": "application/json"},
            content=body,
        )
        assert response.status_code == 422, (body, response.text)
    session = await client.post(
        "/api/v1/sessions",
        headers={**admin.headers, "content-type": "application/json"},
        content='{"agent_id": "' + agent["id"] + '", "variables": {"v": "\\ud800"}}',
    )
    assert session.status_code == 422, session.text


async def test_agent_and_session_changes_are_audited_with_a_diff(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model, temperature=0.2)
    await client.patch(
        f"{AGENTS}/{agent['id']}", headers=admin.headers, json={"temperature": 0.9, "name": "New"}
    )
    session = (
        await client.post(
            "/api/v1/sessions",
            headers=admin.headers,
            json={"agent_id": agent["id"], "variables": {"plan": "free", "api_token": "s3cr3t"}},
        )
    ).json()
    await client.patch(
        f"/api/v1/sessions/{session['id']}",
        headers=admin.headers,
        json={"variables": {"plan": "pro", "api_token": "n3w"}},
    )

    async def entry(action: str) -> dict[str, Any]:
        page = await client.get(
            "/api/v1/audit/logs", headers=admin.headers, params={"action": action}
        )
        (item,) = page.json()["items"]
        return item  # type: ignore[no-any-return]

    updated = await entry("agent.updated")
    assert updated["details"]["changes"] == {
        "config.temperature": {"from": 0.2, "to": 0.9},
        "name": {"from": "Helper", "to": "New"},
    }
    variables = await entry("session.variables.updated")
    assert variables["details"]["changes"]["plan"] == {"from": "free", "to": "pro"}
    assert "s3cr3t" not in str(variables)
    assert "n3w" not in str(variables)
    assert (await entry("agent.published"))["details"] == {"version": 1}

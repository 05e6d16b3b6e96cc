"""Runs: queued over HTTP, executed by the node's worker, streamed through APIX."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from tests.agents.conftest import SlowOpenAI, new_agent, wait_run
from tests.conftest import LiveServer
from tests.identity.factories import bearer, new_api_key, new_org_admin
from tests.providers.factories import new_provider
from tests.providers.fakes import drop, error, ok
from tests.realtime.raw import connected


async def test_a_run_streams_its_answer_on_the_agent_channel_and_records_usage(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("The answer is forty-two, as everyone knows.", input_tokens=21)
    agent = await new_agent(client, admin, model)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe(f"agents:{agent['id']}")
        response = await client.post(
            f"/api/v1/agents/{agent['id']}/runs", headers=admin.headers, json={"input": "Why?"}
        )
        assert response.status_code == 202, response.text
        run = response.json()
        assert run["status"] == "queued"
        events: list[dict[str, Any]] = []
        while not events or events[-1]["type"] != "agent.run.completed":
            (event,) = await raw.events(1, timeout=10)
            events.append(event)
    types = [e["type"] for e in events]
    assert types[:2] == ["agent.run.queued", "agent.run.started"]
    assert types[-2:] == ["message.completed", "agent.run.completed"]
    deltas = [e["data"] for e in events if e["type"] == "message.delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1))
    assert "".join(d["text"] for d in deltas) == "The answer is forty-two, as everyone knows."
    done = await wait_run(client, admin, run["id"])
    assert done["status"] == "completed"
    assert done["output"] == "The answer is forty-two, as everyone knows."
    assert (done["usage"]["input_tokens"], done["usage"]["output_tokens"]) == (21, 7)
    sent = model.calls[-1]["body"]["messages"]
    assert sent == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why?"},
    ]


async def run_events(raw: Any, until: str = "agent.run.completed") -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    while not events or events[-1]["type"] != until:
        (event,) = await raw.events(1, timeout=10)
        events.append(event)
    return events


async def test_a_cancelled_run_stops_within_a_second(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("word " * 200, chunk=5)
    model.delay_s = 0.05  # 10 s of answer
    agent = await new_agent(client, admin, model)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe(f"agents:{agent['id']}")
        run = (
            await client.post(
                f"/api/v1/agents/{agent['id']}/runs", headers=admin.headers, json={"input": "Go"}
            )
        ).json()
        await run_events(raw, until="message.delta")
        asked = time.monotonic()
        cancel = await client.post(f"/api/v1/runs/{run['id']}/cancel", headers=admin.headers)
        assert cancel.status_code == 200, cancel.text
        assert cancel.json()["cancel_requested_at"] is not None
        events = await run_events(raw, until="agent.run.cancelled")
        assert time.monotonic() - asked < 1.0
    done = await wait_run(client, admin, run["id"])
    assert done["status"] == "cancelled"
    assert 0 < len(done["output"]) < len("word " * 200)
    streamed = "".join(e["data"]["text"] for e in events if e["type"] == "message.delta")
    assert done["output"].startswith(streamed)


async def test_a_queued_run_is_cancelled_at_once(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    model.default = ok("slow", chunk=1)
    model.delay_s = 0.5
    session = (
        await client.post("/api/v1/sessions", headers=admin.headers, json={"agent_id": agent["id"]})
    ).json()
    body = {"input": "one", "session_id": session["id"]}
    first = (
        await client.post(f"/api/v1/agents/{agent['id']}/runs", headers=admin.headers, json=body)
    ).json()
    second = (
        await client.post(
            f"/api/v1/agents/{agent['id']}/runs",
            headers=admin.headers,
            json={**body, "input": "two"},
        )
    ).json()
    # The second waits for the first (same session, `enqueue`): cancelling it is immediate.
    cancelled = (
        await client.post(f"/api/v1/runs/{second['id']}/cancel", headers=admin.headers)
    ).json()
    assert cancelled["status"] == "cancelled"
    assert (await wait_run(client, admin, first["id"]))["status"] == "completed"
    assert (await wait_run(client, admin, second["id"]))["status"] == "cancelled"
    assert len(model.calls) == 1


async def test_a_busy_session_rejects_when_asked_and_keeps_order_otherwise(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    model.default = ok("ok", chunk=1)
    model.delay_s = 0.2
    session = (
        await client.post("/api/v1/sessions", headers=admin.headers, json={"agent_id": agent["id"]})
    ).json()
    runs_url = f"/api/v1/agents/{agent['id']}/runs"
    first = (
        await client.post(
            runs_url, headers=admin.headers, json={"input": "first", "session_id": session["id"]}
        )
    ).json()
    rejected = await client.post(
        runs_url,
        headers=admin.headers,
        json={"input": "second", "session_id": session["id"], "busy": "reject"},
    )
    assert rejected.status_code == 409
    assert rejected.json()["error"]["code"] == "session_busy"
    second = (
        await client.post(
            runs_url, headers=admin.headers, json={"input": "second", "session_id": session["id"]}
        )
    ).json()
    one, two = (
        await wait_run(client, admin, first["id"]),
        await wait_run(client, admin, second["id"]),
    )
    assert one["finished_at"] <= two["started_at"]
    # The second run saw the first exchange as context.
    assert [m["content"] for m in model.calls[-1]["body"]["messages"]] == [
        "You are terse.",
        "first",
        "ok",
        "second",
    ]
    detail = (await client.get(f"/api/v1/sessions/{session['id']}", headers=admin.headers)).json()
    # In the order they were written: the second question was queued during the first answer.
    assert [(m["role"], m["content"]) for m in detail["messages"]] == [
        ("user", "first"),
        ("user", "second"),
        ("assistant", "ok"),
        ("assistant", "ok"),
    ]
    assert [m["run_id"] for m in detail["messages"]] == [
        first["id"],
        second["id"],
        first["id"],
        second["id"],
    ]


async def test_the_same_idempotency_key_returns_the_first_run(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    body = {"input": "once", "idempotency_key": "req-1"}
    url = f"/api/v1/agents/{agent['id']}/runs"
    first = await client.post(url, headers=admin.headers, json=body)
    again = await client.post(url, headers=admin.headers, json=body)
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"]
    await wait_run(client, admin, first.json()["id"])
    assert len(model.calls) == 1


async def test_a_provider_failing_mid_answer_fails_over_and_the_client_is_told_to_reset(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI, backup_model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    backup = await new_provider(client, admin, backup_model)
    agent = await new_agent(client, admin, model)
    await client.patch(
        f"/api/v1/providers/{agent['provider']['id']}",
        headers=admin.headers,
        json={"fallback_ids": [backup["id"]]},
    )
    model.default = drop(after=3, text="This answer will be cut short.")
    backup_model.default = ok("The backup's whole answer.")
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe(f"agents:{agent['id']}")
        run = (
            await client.post(
                f"/api/v1/agents/{agent['id']}/runs", headers=admin.headers, json={"input": "Hi"}
            )
        ).json()
        events = await run_events(raw)
    types = [e["type"] for e in events]
    assert "provider.fallback" in types
    assert "message.reset" in types
    hop = next(e["data"] for e in events if e["type"] == "provider.fallback")
    assert (hop["from_provider_id"], hop["to_provider_id"]) == (
        agent["provider"]["id"],
        backup["id"],
    )
    reset = types.index("message.reset")
    after = "".join(e["data"]["text"] for e in events[reset:] if e["type"] == "message.delta")
    assert after == "The backup's whole answer."
    done = await wait_run(client, admin, run["id"])
    assert done["output"] == "The backup's whole answer."
    assert done["usage"]["provider_id"] == backup["id"]


async def test_a_run_with_no_provider_left_fails_with_a_typed_error(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = error(401, "bad key")
    agent = await new_agent(client, admin, model)
    async with connected(live.ws, admin.access_token) as raw:
        await raw.subscribe(f"agents:{agent['id']}")
        run = (
            await client.post(
                f"/api/v1/agents/{agent['id']}/runs", headers=admin.headers, json={"input": "Hi"}
            )
        ).json()
        events = await run_events(raw, until="agent.run.failed")
    failed = events[-1]["data"]
    done = await wait_run(client, admin, run["id"])
    assert done["status"] == "failed"
    assert failed["error"] == done["error"]
    assert done["error"]["code"] in {"provider_auth_error", "no_provider_available"}


async def test_stream_true_answers_as_sse_and_resumes_with_last_event_id(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("Streaming over server-sent events, one delta at a time.", chunk=6)
    model.delay_s = 0.06
    agent = await new_agent(client, admin, model)
    url = f"{live.http}/api/v1/agents/{agent['id']}/runs"
    seen: list[tuple[str, str, dict[str, Any]]] = []
    async with httpx.AsyncClient(timeout=20) as http:
        async with http.stream(
            "POST", url, headers=admin.headers, json={"input": "Go", "stream": True}
        ) as response:
            assert response.status_code == 200  # what EventSource requires
            assert response.headers["content-type"].startswith("text/event-stream")
            async for event_id, event_type, data in sse_events(response):
                seen.append((event_id, event_type, data))
                if sum(t == "message.delta" for _, t, _ in seen) == 2:
                    break  # the client drops mid-answer; the run goes on
        run_id = seen[0][2]["data"]["run_id"]
        last_id = seen[-1][0]
        async with http.stream(
            "GET",
            f"{live.http}/api/v1/runs/{run_id}/events",
            headers={**admin.headers, "Last-Event-ID": last_id},
        ) as response:
            assert response.status_code == 200
            async for event_id, event_type, data in sse_events(response):
                seen.append((event_id, event_type, data))
    types = [t for _, t, _ in seen]
    assert types[0] == "agent.run.queued"
    assert types[-1] == "agent.run.completed"
    deltas = [d["data"] for _, t, d in seen if t == "message.delta"]
    assert [d["seq"] for d in deltas] == list(range(1, len(deltas) + 1)), "lost or repeated"
    assert "".join(d["text"] for d in deltas) == (
        "Streaming over server-sent events, one delta at a time."
    )


async def test_a_run_stream_ends_when_its_api_key_is_revoked(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("A long answer, sent slowly, that the stream must not finish.", chunk=4)
    model.delay_s = 0.1
    agent = await new_agent(client, admin, model)
    key = await new_api_key(client, admin, role="DEVELOPER")
    url = f"{live.http}/api/v1/agents/{agent['id']}/runs"
    types: list[str] = []
    async with (
        httpx.AsyncClient(timeout=20) as http,
        http.stream(
            "POST", url, headers=bearer(key["key"]), json={"input": "Go", "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        async for _, event_type, _ in sse_events(response):
            types.append(event_type)
            if types.count("message.delta") == 1:
                revoked = await client.delete(
                    f"/api/v1/admin/api-keys/{key['id']}", headers=admin.headers
                )
                assert revoked.status_code == 204
    # The stream ended with the revocation, long before the answer's dozen more deltas.
    assert "agent.run.completed" not in types
    assert types.count("message.delta") < 4, types


async def sse_events(response: httpx.Response) -> Any:
    """(id, event, data) of each server-sent event."""
    fields: dict[str, str] = {}
    async for line in response.aiter_lines():
        if not line:
            if "data" in fields:
                yield fields.get("id", ""), fields.get("event", ""), json.loads(fields["data"])
            fields = {}
        elif not line.startswith(":"):
            name, _, value = line.partition(": ")
            fields[name] = value


async def test_another_tenant_gets_404_for_agents_runs_and_sessions(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    owner, stranger = await new_org_admin(client), await new_org_admin(client)
    agent = await new_agent(client, owner, model)
    run = (
        await client.post(
            f"/api/v1/agents/{agent['id']}/runs", headers=owner.headers, json={"input": "x"}
        )
    ).json()
    session = (
        await client.post("/api/v1/sessions", headers=owner.headers, json={"agent_id": agent["id"]})
    ).json()
    for method, path in [
        ("GET", f"/api/v1/agents/{agent['id']}"),
        ("PATCH", f"/api/v1/agents/{agent['id']}"),
        ("POST", f"/api/v1/agents/{agent['id']}/publish"),
        ("GET", f"/api/v1/agents/{agent['id']}/runs"),
        ("GET", f"/api/v1/runs/{run['id']}"),
        ("POST", f"/api/v1/runs/{run['id']}/cancel"),
        ("GET", f"/api/v1/sessions/{session['id']}"),
        ("DELETE", f"/api/v1/sessions/{session['id']}"),
    ]:
        response = await client.request(
            method, path, headers=stranger.headers, json={} if method == "PATCH" else None
        )
        assert response.status_code == 404, (method, path, response.text)
    response = await client.post(
        f"/api/v1/agents/{agent['id']}/runs", headers=stranger.headers, json={"input": "x"}
    )
    assert response.status_code == 404
    await wait_run(client, owner, run["id"])

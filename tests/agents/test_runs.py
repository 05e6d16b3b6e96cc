"""Runs: queued over HTTP, executed by the node's worker, streamed through APIX."""

from __future__ import annotations

from typing import Any

import httpx

from tests.agents.conftest import SlowOpenAI, new_agent, wait_run
from tests.conftest import LiveServer
from tests.identity.factories import new_org_admin
from tests.providers.fakes import ok
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

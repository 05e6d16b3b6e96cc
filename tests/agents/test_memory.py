"""Context assembly: recent messages within the budget; with memory, older ones summarised
once by the model, stored, and reused."""

from __future__ import annotations

import httpx
import pytest

from apix.agents.runner import assemble, estimate_tokens
from apix.agents.schemas import AgentConfig
from apix.config import ProvidersSettings, Settings, WorkerSettings
from tests.agents.conftest import SlowOpenAI, new_agent, wait_run
from tests.conftest import Servers, make_settings
from tests.identity.factories import new_org_admin
from tests.providers.fakes import ok

LONG = "x" * 360  # about 90 tokens by the budget's estimate


@pytest.fixture
def settings(servers: Servers) -> Settings:
    return make_settings(
        servers,
        worker=WorkerSettings(embedded=True, archive=False, context_tokens=400),
        providers=ProvidersSettings(retry_attempts=1),
    )


def test_assembly_keeps_the_newest_messages_that_fit() -> None:
    config = AgentConfig(system_prompt="S")
    history = [("user", f"{n}" * 40) for n in range(10)]  # 11 tokens each
    messages = assemble(
        config, variables={}, summary=None, history=history, user_input="now", budget_tokens=50
    )
    assert messages[0].content == "S"
    assert messages[-1].content == "now"
    kept = [m.content for m in messages[1:-1]]
    assert kept == [content for _, content in history[-len(kept) :]]
    assert sum(estimate_tokens(c) for c in kept) <= 50 - estimate_tokens("S") - estimate_tokens(
        "now"
    )
    assert len(kept) == 4


async def test_with_memory_older_messages_are_summarised_once_and_reused(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    agent = await new_agent(client, admin, model, memory_enabled=True)
    session = (
        await client.post("/api/v1/sessions", headers=admin.headers, json={"agent_id": agent["id"]})
    ).json()
    url = f"/api/v1/agents/{agent['id']}/runs"
    model.default = ok(LONG)
    for n in range(2):  # two exchanges of ~90 tokens a message: the budget (400) holds them
        run = (
            await client.post(
                url,
                headers=admin.headers,
                json={"input": f"{n}{LONG}", "session_id": session["id"]},
            )
        ).json()
        assert (await wait_run(client, admin, run["id"]))["status"] == "completed"
    calls_before = len(model.calls)
    # A third long question leaves the oldest message out: it is summarised first.
    model.then(ok("SUMMARY: the user sent long x strings."), ok("third answer"))
    third = (
        await client.post(
            url, headers=admin.headers, json={"input": f"third{LONG}", "session_id": session["id"]}
        )
    ).json()
    assert (await wait_run(client, admin, third["id"]))["output"] == "third answer"
    summarise, answer = model.calls[calls_before:]
    assert summarise["body"]["messages"][0]["content"].startswith("Summarise the conversation")
    assert "user: 0xxx" in summarise["body"]["messages"][1]["content"]
    system = answer["body"]["messages"][0]["content"]
    assert "SUMMARY: the user sent long x strings." in system
    stored = (await client.get(f"/api/v1/sessions/{session['id']}", headers=admin.headers)).json()
    assert stored["summary"] == "SUMMARY: the user sent long x strings."
    # The next run reuses the stored summary: nothing new fell out of the budget.
    model.default = ok("fourth answer")
    fourth = (
        await client.post(
            url, headers=admin.headers, json={"input": "4", "session_id": session["id"]}
        )
    ).json()
    await wait_run(client, admin, fourth["id"])
    (last,) = model.calls[calls_before + 2 :]
    assert "SUMMARY: the user sent long x strings." in last["body"]["messages"][0]["content"]

"""The OpenAI-compatible endpoint, driven by the official `openai` package over real HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import hypothesis
import openai
import pytest
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from openai import AsyncStream
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.agents.conftest import SlowOpenAI, new_agent, wait_run
from tests.conftest import LiveServer
from tests.identity.factories import Account, bearer, new_api_key, new_org_admin
from tests.providers.factories import new_provider
from tests.providers.fakes import drop, error, ok

OPENAI = "/api/v1/openai"


@asynccontextmanager
async def sdk(live: LiveServer, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official client pointed at APIX; its own retries off, so each call is one run."""
    async with openai.AsyncOpenAI(
        base_url=f"{live.http}{OPENAI}", api_key=api_key, max_retries=0, timeout=20
    ) as client:
        yield client


async def developer_key(client: httpx.AsyncClient, admin: Account, **body: Any) -> str:
    body.setdefault("role", "DEVELOPER")
    key: str = (await new_api_key(client, admin, **body))["key"]
    assert key.startswith("apx_")
    return key


async def read_text(stream: AsyncStream[ChatCompletionChunk], into: list[str]) -> None:
    """Read a stream to its end, keeping its text as it comes (for streams that raise)."""
    async for chunk in stream:
        if chunk.choices:
            into.append(chunk.choices[0].delta.content or "")


def run_id_of(completion_id: str) -> str:
    assert completion_id.startswith("chatcmpl-")
    return completion_id.removeprefix("chatcmpl-")


async def test_a_chat_completion_is_the_agents_answer_with_the_runs_usage(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("Forty-two.", input_tokens=21, output_tokens=3)
    agent = await new_agent(client, admin, model)
    async with sdk(live, await developer_key(client, admin)) as oa:
        completion = await oa.chat.completions.create(
            model=agent["slug"], messages=[{"role": "user", "content": "Why?"}]
        )
    assert completion.object == "chat.completion"
    assert completion.model == agent["slug"]
    (choice,) = completion.choices
    assert (choice.message.role, choice.message.content) == ("assistant", "Forty-two.")
    assert choice.finish_reason == "stop"
    assert completion.usage is not None
    usage = completion.usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (21, 3, 24)
    run = await wait_run(client, admin, run_id_of(completion.id))
    assert (run["status"], run["output"], run["input"]) == ("completed", "Forty-two.", "Why?")
    assert run["metadata"] == {"source": "openai"}
    assert model.calls[-1]["body"]["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Why?"},
    ]


async def test_a_streamed_completion_sends_the_answer_in_chunks_then_usage_and_done(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    answer = "Streaming through APIX, chunk by chunk, as OpenAI does."
    model.default = ok(answer, chunk=5, input_tokens=17, output_tokens=12)
    model.delay_s = 0.02
    agent = await new_agent(client, admin, model)
    async with sdk(live, await developer_key(client, admin)) as oa:
        stream = await oa.chat.completions.create(
            model=agent["slug"],
            messages=[{"role": "user", "content": "Stream it"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert len({c.id for c in chunks}) == 1
    assert {c.model for c in chunks} == {agent["slug"]}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer
    with_choices = [c for c in chunks if c.choices]
    assert [c.choices[0].finish_reason for c in with_choices][-1] == "stop"
    assert all(c.choices[0].finish_reason is None for c in with_choices[:-1])
    assert sum(1 for c in with_choices if c.choices[0].delta.content) > 1, "not streamed"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (17, 12)
    assert all(c.usage is None for c in chunks[:-1])
    run = await wait_run(client, admin, run_id_of(chunks[0].id))
    assert run["output"] == answer


async def test_a_stream_without_usage_asked_has_no_usage_chunk_and_ends_with_done(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("Short.")
    agent = await new_agent(client, admin, model)
    body = {"model": agent["slug"], "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    key = await developer_key(client, admin)
    async with (
        httpx.AsyncClient(timeout=20) as http,
        http.stream(
            "POST", f"{live.http}{OPENAI}/chat/completions", headers=bearer(key), json=body
        ) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-apix-run-id"]
        lines = [line async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert all('"usage"' not in line for line in lines)


async def test_earlier_messages_are_the_context_and_a_session_id_continues_the_conversation(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("Noted.")
    agent = await new_agent(client, admin, model)
    async with sdk(live, await developer_key(client, admin)) as oa:
        raw = await oa.chat.completions.with_raw_response.create(
            model=agent["slug"],
            user="end-user-7",
            messages=[
                {"role": "system", "content": "Answer in French."},
                {"role": "user", "content": "My name is Ada."},
                {"role": "assistant", "content": "Bonjour Ada."},
                {"role": "user", "content": [{"type": "text", "text": "Remember it."}]},
            ],
        )
        first = raw.parse()
        session_id = raw.headers["x-apix-session-id"]
        assert raw.headers["x-apix-run-id"] == run_id_of(first.id)
        assert model.calls[-1]["body"]["messages"] == [
            {
                "role": "system",
                "content": "You are terse.\n\nSession variables:\ninstructions: Answer in French.",
            },
            {"role": "user", "content": "My name is Ada."},
            {"role": "assistant", "content": "Bonjour Ada."},
            {"role": "user", "content": "Remember it."},
        ]
        # Only the new message: the session holds the rest, this run's answer included.
        await oa.chat.completions.create(
            model=agent["slug"],
            messages=[{"role": "user", "content": "What is my name?"}],
            extra_body={"apix_session_id": session_id},
        )
    assert [m["content"] for m in model.calls[-1]["body"]["messages"][1:]] == [
        "My name is Ada.",
        "Bonjour Ada.",
        "Remember it.",
        "Noted.",
        "What is my name?",
    ]
    session = (await client.get(f"/api/v1/sessions/{session_id}", headers=admin.headers)).json()
    assert session["end_user_id"] == "end-user-7"
    assert session["agent_id"] == agent["id"]
    assert [m["role"] for m in session["messages"]] == ["user", "assistant"] * 3


async def test_a_user_token_and_a_key_scoped_to_agent_permissions_work_too(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("Yes.")
    agent = await new_agent(client, admin, model)
    # A key with permissions and no role is a VIEWER: it follows the run on the agent's
    # channel (it may not subscribe to session channels).
    scoped = await new_api_key(client, admin, permissions=["agents:read", "agents:write"])
    for credential in (admin.access_token, scoped["key"]):
        async with sdk(live, credential) as oa:
            completion = await oa.chat.completions.create(
                model=agent["slug"], messages=[{"role": "user", "content": "Works?"}]
            )
            stream = await oa.chat.completions.create(
                model=agent["slug"], messages=[{"role": "user", "content": "Works?"}], stream=True
            )
            streamed = "".join(
                [c.choices[0].delta.content or "" async for c in stream if c.choices]
            )
        assert completion.choices[0].message.content == streamed == "Yes."


async def test_errors_raise_the_sdks_exception_classes_with_openais_error_shape(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin, stranger = await new_org_admin(client), await new_org_admin(client)
    agent = await new_agent(client, admin, model)
    draft = await new_agent(client, admin, model, publish=False)
    theirs = await new_agent(client, stranger, model)
    key = await developer_key(client, admin)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
    async with sdk(live, key) as oa:
        for slug in ("no-such-agent", "NOT A SLUG", theirs["slug"], draft["slug"]):
            with pytest.raises(openai.NotFoundError) as missing:
                await oa.chat.completions.create(model=slug, messages=hello)
            assert missing.value.code == "model_not_found"
            assert missing.value.param == "model"
            assert missing.value.type == "invalid_request_error"
        with pytest.raises(openai.NotFoundError):
            await oa.models.retrieve(theirs["slug"])
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(
                model=agent["slug"],
                messages=[*hello, {"role": "assistant", "content": "Hi"}],
            )
        assert bad.value.param == "messages.1"
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(
                model=agent["slug"],
                messages=hello,
                tools=[{"type": "function", "function": {"name": "f"}}],
            )
        assert bad.value.param == "tools"
        with pytest.raises(openai.BadRequestError) as bad:
            await oa.chat.completions.create(
                model=agent["slug"],
                messages=hello,
                temperature=7,
            )
        assert bad.value.param == "temperature"
        with pytest.raises(openai.NotFoundError) as gone:
            await oa.chat.completions.create(
                model=agent["slug"],
                messages=hello,
                extra_body={"apix_session_id": str(uuid.uuid4())},
            )
        assert (gone.value.code, gone.value.param) == ("session_not_found", "apix_session_id")
    async with sdk(live, "apx_not-a-real-key") as oa:
        with pytest.raises(openai.AuthenticationError) as unauthenticated:
            await oa.chat.completions.create(model=agent["slug"], messages=hello)
        assert unauthenticated.value.type == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            await oa.models.list()
    reader = await developer_key(client, admin, role="VIEWER")
    async with sdk(live, reader) as oa:
        with pytest.raises(openai.PermissionDeniedError):
            await oa.chat.completions.create(model=agent["slug"], messages=hello)
    response = await client.post(
        f"{OPENAI}/chat/completions", headers=bearer(key), content=b"{not json"
    )
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


async def test_the_models_are_the_organisations_published_agents(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin, stranger = await new_org_admin(client), await new_org_admin(client)
    one = await new_agent(client, admin, model)
    two = await new_agent(client, admin, model)
    await new_agent(client, admin, model, publish=False)
    await new_agent(client, stranger, model)
    async with sdk(live, await developer_key(client, admin, role="VIEWER")) as oa:
        models = [m async for m in oa.models.list()]
        fetched = await oa.models.retrieve(one["slug"])
    assert sorted(m.id for m in models) == sorted([one["slug"], two["slug"]])
    assert {(m.object, m.owned_by) for m in models} == {("model", admin.org_id)}
    assert fetched.id == one["slug"]
    assert fetched.created == next(m.created for m in models if m.id == one["slug"])


async def test_a_client_leaving_a_stream_cancels_the_run(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("word " * 200, chunk=5)
    model.delay_s = 0.05  # 10 s of answer
    agent = await new_agent(client, admin, model)
    async with sdk(live, await developer_key(client, admin)) as oa:
        stream = await oa.chat.completions.create(
            model=agent["slug"], messages=[{"role": "user", "content": "Go on"}], stream=True
        )
        received = ""
        async for chunk in stream:
            received += chunk.choices[0].delta.content or ""
            if received:
                break
        await stream.close()
    run = await wait_run(client, admin, run_id_of(chunk.id), timeout=5)
    assert run["status"] == "cancelled"
    assert run["output"].startswith(received)
    assert len(run["output"]) < len("word " * 200)


async def test_a_client_leaving_a_plain_request_cancels_the_run(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("word " * 200, chunk=5)
    model.delay_s = 0.05
    agent = await new_agent(client, admin, model)
    async with openai.AsyncOpenAI(
        base_url=f"{live.http}{OPENAI}",
        api_key=await developer_key(client, admin),
        max_retries=0,
        timeout=1.0,
    ) as oa:
        with pytest.raises(openai.APITimeoutError):
            await oa.chat.completions.create(
                model=agent["slug"], messages=[{"role": "user", "content": "Go on"}]
            )
    runs = (await client.get(f"/api/v1/agents/{agent['id']}/runs", headers=admin.headers)).json()
    (run,) = runs["items"]
    # Not ended within 5 s once, on a loaded machine: the default wait. Uncancelled, the run
    # would complete (200 deltas 50 ms apart: about 10 s), so the check fails without the cancel.
    assert (await wait_run(client, admin, run["id"]))["status"] == "cancelled"


async def test_a_failed_run_is_an_error_of_the_matching_class(
    client: httpx.AsyncClient, live: LiveServer, model: SlowOpenAI
) -> None:
    admin = await new_org_admin(client)
    model.default = error(401, "the provider's key is wrong")
    agent = await new_agent(client, admin, model)
    hello: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Hello"}]
    async with sdk(live, await developer_key(client, admin)) as oa:
        with pytest.raises(openai.InternalServerError) as failed:
            await oa.chat.completions.create(model=agent["slug"], messages=hello)
        assert failed.value.status_code == 503
        assert failed.value.code in {"provider_auth_error", "no_provider_available"}
        stream = await oa.chat.completions.create(
            model=agent["slug"],
            messages=hello,
            stream=True,
        )
        with pytest.raises(openai.APIError) as streamed:
            await read_text(stream, [])
        assert streamed.value.code == failed.value.code
    model.default = error(429, "slow down")
    async with sdk(live, await developer_key(client, admin)) as oa:
        with pytest.raises(openai.RateLimitError):
            await oa.chat.completions.create(model=agent["slug"], messages=hello)


async def test_a_failover_after_streamed_text_ends_the_stream_with_an_error(
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
    cut = "This answer will be cut short by a dropped connection."
    model.default = drop(after=4, text=cut)
    model.delay_s = 0.1  # the first deltas reach the client before the drop
    backup_model.default = ok("The backup's whole answer.")
    async with sdk(live, await developer_key(client, admin)) as oa:
        stream = await oa.chat.completions.create(
            model=agent["slug"], messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        parts: list[str] = []
        with pytest.raises(openai.APIError) as restarted:
            await read_text(stream, parts)
        received = "".join(parts)
        assert restarted.value.code == "answer_restarted"
        assert received
        assert cut.startswith(received)
        # Without text sent yet, a failover is invisible: the answer is the backup's.
        model.delay_s = 0
        model.default = drop(after=0, text=cut)
        completion = await oa.chat.completions.create(
            model=agent["slug"], messages=[{"role": "user", "content": "Hi"}], stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in completion if c.choices])
    assert text == "The backup's whole answer."


async def test_the_python_example_in_the_docs_runs(
    client: httpx.AsyncClient,
    live: LiveServer,
    model: SlowOpenAI,
    repo_root: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    admin = await new_org_admin(client)
    model.default = ok("Hello from the agent.")
    agent = await new_agent(client, admin, model)
    docs = (repo_root / "docs" / "openai-compatible.md").read_text()
    example = next(b for b in re.findall(r"```python\n(.*?)```", docs, re.DOTALL) if "main(" in b)
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(compile(example, "docs/openai-compatible.md", "exec"), namespace)  # noqa: S102 - our docs
    key = await developer_key(client, admin)
    await asyncio.wait_for(namespace["main"](live.http, key, agent["slug"]), 20)
    out = capsys.readouterr().out
    assert out.count("Hello from the agent.") == 2
    assert agent["slug"] in out


# --- hostile input ----------------------------------------------------------------------

_PROPERTY = hypothesis.settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_REAL = "<the agent's slug>"
_TEXT = st.one_of(
    st.text(max_size=50),
    st.sampled_from(["", " ", "before\x00after", "\ud800", "x" * 300, "user", "assistant"]),
)
_SCALAR = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | _TEXT
)
# Two levels of nesting, spelled out (st.recursive warned spuriously under load).
_JSON = (
    _SCALAR
    | st.lists(_SCALAR, max_size=3)
    | st.dictionaries(st.text(max_size=8), _SCALAR | st.lists(_SCALAR, max_size=3), max_size=3)
)
_ROLE = st.sampled_from(["system", "developer", "user", "assistant", "tool", "function", "x"])
_PART = st.fixed_dictionaries(
    {}, optional={"type": st.sampled_from(["text", "image_url"]) | _JSON, "text": _TEXT | _JSON}
)
_MESSAGE = st.fixed_dictionaries(
    {},
    optional={
        "role": _ROLE | _JSON,
        "content": _TEXT | st.lists(_PART, max_size=3) | _JSON,
        "tool_calls": _JSON,
        "name": _TEXT,
    },
)
_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "messages": st.lists(_MESSAGE, max_size=4) | _JSON,
    "stream": st.booleans() | _JSON,
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}) | _JSON,
    "temperature": st.floats(-1, 3) | _JSON,
    "max_tokens": st.integers(-5, 10**12) | _JSON,
    "n": st.integers(-1, 3) | _JSON,
    "user": _TEXT | _JSON,
    "tools": st.just([]) | _JSON,
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])})
    | _JSON,
    "apix_session_id": st.uuids().map(str) | _JSON,
    "top_p": _JSON,
}
_ANY_BODY = st.fixed_dictionaries({}, optional={"model": _TEXT | _JSON | st.just(_REAL), **_FIELDS})
# Well-formed requests around hostile text: they reach the session, the run and the stream.
_CONVERSATION = st.lists(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": _TEXT}
    ),
    max_size=3,
).map(lambda earlier: [*earlier, {"role": "user", "content": "Hi"}])
_WELL_FORMED = st.fixed_dictionaries(
    {"model": st.just(_REAL), "messages": _CONVERSATION},
    optional={
        "user": _TEXT,
        "stream": st.booleans(),
        "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
        "temperature": st.floats(0, 2),
        "max_tokens": st.integers(1, 10**6),
    },
)


@pytest.fixture
async def hostile_target(
    client: httpx.AsyncClient, model: SlowOpenAI
) -> tuple[dict[str, str], str]:
    admin = await new_org_admin(client)
    model.default = ok("Fine.")
    agent = await new_agent(client, admin, model)
    return bearer(await developer_key(client, admin)), agent["slug"]


async def post_completion(
    client: httpx.AsyncClient, target: tuple[dict[str, str], str], body: dict[str, Any]
) -> None:
    """Post ``body`` (``_REAL`` as the model: the agent's slug); a typed answer, never a 5xx."""
    headers, slug = target
    if body.get("model") == _REAL:
        body["model"] = slug
    # Encoded here, ASCII-escaped: lone surrogates reach the server as JSON allows them.
    response = await client.post(
        f"{OPENAI}/chat/completions",
        headers={**headers, "Content-Type": "application/json"},
        content=json.dumps(body),
    )
    hypothesis.event(f"status {response.status_code}")
    assert response.status_code in {200, 400, 404}, response.text
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@_PROPERTY
@given(body=_ANY_BODY)
async def test_any_request_body_is_refused_in_openais_shape_never_with_a_5xx(
    client: httpx.AsyncClient, hostile_target: tuple[dict[str, str], str], body: dict[str, Any]
) -> None:
    await post_completion(client, hostile_target, body)


@_PROPERTY
@given(body=_WELL_FORMED)
async def test_any_well_formed_request_is_answered_or_refused_never_with_a_5xx(
    client: httpx.AsyncClient, hostile_target: tuple[dict[str, str], str], body: dict[str, Any]
) -> None:
    await post_completion(client, hostile_target, body)

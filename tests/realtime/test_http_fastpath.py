"""HTTP publish's fast path (`apix.realtime.fastpath`) answers as the FastAPI route it shadows.

The expected answers below were recorded from the FastAPI route before the fast path existed;
`reference` serves the same app without the fast path, so every case also runs against the
route itself, byte for byte.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import httpx
import pytest
import redis.exceptions
from fastapi import FastAPI
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from apix.config import MonitoringSettings, Settings
from apix.realtime import service
from apix.realtime.schemas import PublishRequest, PublishResult
from tests.conftest import LiveServer, Servers, make_settings, serve_app
from tests.identity.factories import Account, new_api_key, new_member, new_org_admin

TEMPLATE = "/api/v1/apix/channels/{channel}/events"
METRICS_TOKEN = "metrics-token-for-fast-path-tests"
JSON = {"Content-Type": "application/json"}
EVENT = b'{"type":"a.b","data":1}'


def events_url(channel: str) -> str:
    return TEMPLATE.format(channel=channel)


def error(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "details": details}}


def invalid(*details: tuple[list[str], str, str]) -> dict[str, Any]:
    errors = [{"loc": loc, "message": message, "type": kind} for loc, message, kind in details]
    return error("validation_error", "the request is not valid", errors)


@pytest.fixture
def settings(servers: Servers) -> Settings:
    # CORS stays on (the default allows any origin); the metrics show the route label.
    return make_settings(servers, monitoring=MonitoringSettings(metrics_token=METRICS_TOKEN))


def fastapi_only(app: FastAPI) -> ASGIApp:
    """The app without the fast path: FastAPI's own handling of every request, with the same
    state, routes and middleware."""

    async def asgi(scope: Scope, receive: Receive, send: Send) -> None:
        await FastAPI.__call__(app, scope, receive, send)

    return asgi


@pytest.fixture
async def http(live: LiveServer) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=live.http) as client:
        yield client


@pytest.fixture
async def route_http(app: FastAPI, settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """Real HTTP to the FastAPI route itself."""
    async with (
        serve_app(fastapi_only(app), settings) as server,
        httpx.AsyncClient(base_url=server.http) as client,
    ):
        yield client


@pytest.fixture
async def admin(client: httpx.AsyncClient) -> Account:
    return await new_org_admin(client)


async def both(
    http: httpx.AsyncClient, route_http: httpx.AsyncClient, url: str, **kwargs: Any
) -> httpx.Response:
    """POST to the fast path and to the route; assert the same answer; return the first."""
    headers = {"X-Request-ID": f"req-{uuid.uuid4().hex}", **kwargs.pop("headers", {})}
    fast = await http.post(url, headers=headers, **kwargs)
    route = await route_http.post(url, headers=headers, **kwargs)
    assert fast.status_code == route.status_code, (url, fast.text, route.text)
    assert list(fast.headers) == list(route.headers)
    assert fast.headers["x-request-id"] == headers["X-Request-ID"]
    if fast.status_code == 201:
        assert fast.json().keys() == route.json().keys() == PublishResult.model_fields.keys()
    else:
        assert fast.content == route.content
    return fast


BAD_TYPE = "String should match pattern '^[a-z][a-z0-9_]*(\\.[a-z0-9_]+)*$'"
NOT_AN_OBJECT = "Input should be a valid dictionary or object to extract fields from"
NO_CREDENTIAL = error("unauthorized", "a bearer token or API key is required")
MISSING_TYPE = invalid((["body", "type"], "Field required", "missing"))
NOT_PARSED = invalid((["body"], NOT_AN_OBJECT, "model_attributes_type"))


def malformed(position: int) -> dict[str, Any]:
    details = [
        {"loc": ["body", str(position)], "message": "JSON decode error", "type": "json_invalid"}
    ]
    return error("malformed_json", "the request body is not valid JSON", details)


class Case(NamedTuple):
    who: str
    body: bytes
    status: int
    expected: dict[str, Any]
    channel: str = "room:x"
    content_type: str | None = "application/json"


# What the FastAPI route answered, recorded before the fast path existed.
RECORDED = [
    Case("nobody", EVENT, 401, NO_CREDENTIAL),
    Case("basic", EVENT, 401, NO_CREDENTIAL),
    Case("bad bearer", EVENT, 401, error("invalid_token", "malformed token")),
    Case("bad key", EVENT, 401, error("invalid_token", "unknown or revoked API key")),
    # The body is parsed before the caller is authenticated, and validated after.
    Case("nobody", b'{"type":', 400, malformed(8)),
    Case("nobody", b'{"data":1}', 401, NO_CREDENTIAL),
    Case("admin", b'{"type": x}', 400, malformed(9)),
    Case(
        "admin",
        b'{"type":"a.b","data":"\xff"}',
        400,
        error("bad_request", "There was an error parsing the body"),
    ),
    Case("admin", b'{"data":1}', 422, MISSING_TYPE),
    Case(
        "admin",
        b'{"type":"Not A Type"}',
        422,
        invalid((["body", "type"], BAD_TYPE, "string_pattern_mismatch")),
    ),
    Case(
        "admin",
        b'{"type":"a.b","x":1}',
        422,
        invalid((["body", "x"], "Extra inputs are not permitted", "extra_forbidden")),
    ),
    Case(
        "admin",
        b'{"type":"a.b","idempotency_key":"' + b"k" * 201 + b'"}',
        422,
        invalid(
            (
                ["body", "idempotency_key"],
                "String should have at most 200 characters",
                "string_too_long",
            )
        ),
    ),
    Case("admin", b"", 422, invalid((["body"], "Field required", "missing"))),
    Case("admin", b"[1,2]", 422, NOT_PARSED),
    # Only JSON content types are parsed; no content type is not JSON.
    Case("admin", EVENT, 422, NOT_PARSED, content_type="text/plain"),
    Case("admin", EVENT, 422, NOT_PARSED, content_type=None),
    # The body is validated before the channel is looked at.
    Case("admin", b'{"data":1}', 422, MISSING_TYPE, channel="Room:x"),
    Case("admin", EVENT, 400, error("bad_request", "invalid channel name 'Room:x'"), "Room:x"),
    Case(
        "admin",
        EVENT,
        400,
        error("bad_request", "invalid channel name 'room:a b'"),
        channel="room:a%20b",
    ),
    Case("admin", EVENT, 404, error("not_found", "unknown channel namespace 'nope'"), "nope:x"),
    # An encoded slash is a slash: another path, which no route matches.
    Case("admin", EVENT, 404, error("not_found", "no such resource"), channel="room:a%2Fb"),
    Case("key", EVENT, 403, error("forbidden", "user:me needs a user's token"), "user:me"),
    Case("viewer", EVENT, 403, error("forbidden", "missing permission apix:publish")),
    Case("admin", EVENT, 403, error("forbidden", "not allowed to publish to monitor"), "monitor"),
]


async def credentials(client: httpx.AsyncClient, admin: Account) -> dict[str, dict[str, str]]:
    viewer = await new_member(client, admin, "VIEWER")
    key = await new_api_key(client, admin, role="DEVELOPER")
    return {
        "nobody": {},
        "basic": {"Authorization": "Basic abc"},
        "bad bearer": {"Authorization": "Bearer nonsense"},
        "bad key": {"X-API-Key": "apx_nonsense"},
        "admin": admin.headers,
        "viewer": viewer.headers,
        "key": {"X-API-Key": key["key"]},
    }


async def test_errors_are_the_routes_recorded_answers(
    client: httpx.AsyncClient,
    http: httpx.AsyncClient,
    route_http: httpx.AsyncClient,
    admin: Account,
) -> None:
    who = await credentials(client, admin)
    for case in RECORDED:
        headers = dict(who[case.who])
        if case.content_type:
            headers["Content-Type"] = case.content_type
        url = events_url(case.channel)
        response = await both(http, route_http, url, headers=headers, content=case.body)
        assert (response.status_code, response.json()) == (case.status, case.expected), case
    # Nothing was published by the refused attempts.
    history = await client.get(events_url("room:x"), headers=admin.headers)
    assert history.json()["events"] == []


async def test_bodies_over_the_limit_are_413(
    http: httpx.AsyncClient, route_http: httpx.AsyncClient, admin: Account
) -> None:
    big = b'{"type":"a.b","data":"' + b"x" * 1_100_000 + b'"}'
    expected = error("too_large", "request body larger than 1048576 bytes")
    headers = {**JSON, **admin.headers}
    response = await both(http, route_http, events_url("room:x"), headers=headers, content=big)
    assert (response.status_code, response.json()) == (413, expected)

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the limit while reading
        yield big

    for client in (http, route_http):
        response = await client.post(events_url("room:x"), headers=headers, content=chunked())
        assert (response.status_code, response.json()) == (413, expected)


async def test_publish_with_a_token_and_an_api_key(
    app: Any,
    client: httpx.AsyncClient,
    http: httpx.AsyncClient,
    route_http: httpx.AsyncClient,
    admin: Account,
) -> None:
    key = await new_api_key(client, admin, role="DEVELOPER")
    published = []
    for n, headers in enumerate((admin.headers, {"X-API-Key": key["key"]})):
        body = {"type": "chat.message", "data": {"n": n, "text": "héllo"}}
        response = await both(http, route_http, events_url("room:x"), headers=headers, json=body)
        assert response.status_code == 201, response.text
        assert response.headers["content-type"] == "application/json"
        result = response.json()
        assert result["duplicate"] is False
        assert all(isinstance(result[f], str) for f in ("offset", "epoch", "id"))
        published.append(result)
    # Other JSON content types are JSON too.
    for content_type in ("application/json; charset=utf-8", "application/vnd.apix+json"):
        headers = {**admin.headers, "Content-Type": content_type}
        response = await both(
            http, route_http, events_url("room:x"), headers=headers, content=EVENT
        )
        assert response.status_code == 201, response.text

    history = (await client.get(events_url("room:x"), headers=admin.headers)).json()
    events = history["events"]
    assert len(events) == 8  # each publish above went to both
    assert [(e["id"], e["offset"]) for e in events[0:4:2]] == [
        (p["id"], p["offset"]) for p in published
    ]
    assert events[0]["data"] == {"n": 0, "text": "héllo"}
    assert events[0]["meta"]["actor_kind"] == "user"
    assert events[2]["meta"]["actor_kind"] == "api_key"

    # The key's calls are counted for analytics, as with every route.
    await app.state.api_usage.flush(app.state.database)
    usage = await client.get("/api/v1/analytics/usage", headers=admin.headers)
    rows = usage.json()["items"]
    assert [(r["api_key_id"], r["requests"], r["errors"]) for r in rows] == [(key["id"], 2, 0)]


async def test_an_idempotency_key_publishes_once(http: httpx.AsyncClient, admin: Account) -> None:
    body = {"type": "order.paid", "data": {"order": 7}, "idempotency_key": "order-7"}
    first = await http.post(events_url("room:orders"), headers=admin.headers, json=body)
    again = await http.post(events_url("room:orders"), headers=admin.headers, json=body)
    assert first.status_code == again.status_code == 201
    assert first.json()["duplicate"] is False
    assert again.json() == {**first.json(), "duplicate": True}


async def test_channel_names_are_percent_decoded(
    client: httpx.AsyncClient, http: httpx.AsyncClient, admin: Account
) -> None:
    for raw, channel in (
        ("room%3Ahttp", "room:http"),
        ("room:a%40b.c%3Dd", "room:a@b.c=d"),
        ("user:me", f"user:{admin.user_id}"),
    ):
        response = await http.post(events_url(raw), headers=admin.headers, json={"type": "a.b"})
        assert response.status_code == 201, (raw, response.text)
        history = (await client.get(events_url(channel), headers=admin.headers)).json()
        assert [e["id"] for e in history["events"]] == [response.json()["id"]]
        assert history["events"][0]["channel"] == channel


async def test_the_request_id_route_label_and_cors_stay(
    http: httpx.AsyncClient, admin: Account
) -> None:
    headers = {**admin.headers, "X-Request-ID": "my-request-1", "Origin": "https://app.test"}
    response = await http.post(events_url("room:x"), headers=headers, json={"type": "a.b"})
    assert response.status_code == 201, response.text
    assert response.headers["x-request-id"] == "my-request-1"
    assert response.headers["access-control-allow-origin"] == "*"
    assert "x-request-id" in response.headers["access-control-expose-headers"].lower()
    refused = await http.post(events_url("room:x"), json={"type": "a.b"})
    assert refused.status_code == 401
    assert len(refused.headers["x-request-id"]) == 32  # made up when the client sent none

    metrics = await http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert metrics.status_code == 200, metrics.text
    counts = {
        (s.labels["route"], s.labels["method"], s.labels["status"]): s.value
        for family in text_string_to_metric_families(metrics.text)
        if family.name == "apix_http_requests"
        for s in family.samples
        if s.name == "apix_http_requests_total"
    }
    assert counts[(TEMPLATE, "POST", "201")] == 1
    assert counts[(TEMPLATE, "POST", "401")] == 1
    assert not [labels for labels in counts if labels[0] == "unmatched"]


async def test_other_requests_still_reach_the_routes(
    app: FastAPI, http: httpx.AsyncClient, route_http: httpx.AsyncClient, admin: Account
) -> None:
    for method, path in (
        ("GET", events_url("room:x")),
        ("PUT", events_url("room:x")),
        ("POST", events_url("room:x") + "/"),
        ("POST", "/api/v1/apix/channels/events"),
        ("POST", "/api/v1/apix/channels/room:x/events/more"),
    ):
        headers = {**admin.headers, "X-Request-ID": "same"}
        fast = await http.request(method, path, headers=headers, json={"type": "a.b"})
        route = await route_http.request(method, path, headers=headers, json={"type": "a.b"})
        assert (fast.status_code, fast.content) == (route.status_code, route.content), path
        assert fast.status_code != 201

    # Behind a proxy that mounts the API under a prefix (`root_path`).
    for target in (app, fastapi_only(app)):
        transport = httpx.ASGITransport(app=target, root_path="/edge")
        async with httpx.AsyncClient(transport=transport, base_url="http://apix.test") as edge:
            for path in ("/edge" + events_url("room:edge"), events_url("room:edge")):
                response = await edge.post(path, headers=admin.headers, json={"type": "a.b"})
                assert response.status_code == 201, (path, response.text)
            response = await edge.post("/edge" + events_url("Room"), headers=admin.headers)
            assert response.status_code == 422


async def test_publish_is_answered_by_the_fast_path_only(
    app: Any, http: httpx.AsyncClient, admin: Account, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Publish goes to the fast path, not through FastAPI's stack; other requests do not."""
    taken: list[str] = []
    answer = app.publish._publish

    async def counted(request: Any, channel: str, send: Send) -> None:
        taken.append(channel)
        await answer(request, channel, send)

    stacked: list[str] = []
    app.middleware_stack = app.build_middleware_stack()
    stack = app.middleware_stack

    async def entered(scope: Scope, receive: Receive, send: Send) -> None:
        stacked.append(f"{scope['method']} {scope['path']}")
        await stack(scope, receive, send)

    monkeypatch.setattr(app.publish, "_publish", counted)
    monkeypatch.setattr(app, "middleware_stack", entered)
    url = events_url("room:fast")
    response = await http.post(url, headers=admin.headers, json={"type": "a"})
    assert response.status_code == 201
    assert (taken, stacked) == (["room:fast"], [])
    response = await http.get(url, headers=admin.headers)
    assert response.status_code == 200
    assert (taken, stacked) == (["room:fast"], [f"GET {url}"])

    # With FastAPI's own telemetry on (a provider configured), publish is FastAPI's to trace.
    monkeypatch.setattr(app._native_telemetry, "enabled", lambda: True)
    response = await http.post(url, headers=admin.headers, json={"type": "a"})
    assert response.status_code == 201
    assert taken == ["room:fast"]
    assert stacked[-1] == f"POST {url}"


async def test_a_backend_outage_is_503(
    monkeypatch: pytest.MonkeyPatch,
    http: httpx.AsyncClient,
    route_http: httpx.AsyncClient,
    admin: Account,
) -> None:
    async def down(*_args: Any, **_kwargs: Any) -> dict[str, Any]:
        raise redis.exceptions.ConnectionError("Redis is down")

    monkeypatch.setattr(service, "publish", down)
    response = await both(http, route_http, events_url("room:x"), headers=admin.headers, json={})
    assert response.status_code == 422  # the body is still checked first
    body = {"type": "a.b"}
    response = await both(http, route_http, events_url("room:x"), headers=admin.headers, json=body)
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == error(
        "unavailable", "a backing service is unavailable; retry shortly"
    )


async def test_openapi_still_documents_the_route(http: httpx.AsyncClient) -> None:
    document = (await http.get("/api/openapi.json")).json()
    operation = document["paths"][TEMPLATE]["post"]
    assert operation["summary"] == "Publish an event to a channel of the caller's organisation"
    assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PublishRequest"
    )
    assert operation["responses"]["201"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/PublishResult"
    )


# Channel names: the grammar's pieces and what breaks it, percent-encoded or not.
CHANNEL = st.one_of(
    st.sampled_from(["room:x", "org", "hitl", "user:me", "monitor", "system", "nope:x", "room"]),
    st.builds(
        lambda ns, key: f"{ns}:{key}",
        st.sampled_from(["room", "agents", "sessions", "org", "Room", "user"]),
        st.text(alphabet="aZ09_.@=-:% é#?", min_size=0, max_size=12),
    ),
).map(lambda name: name.replace("%", "%25").replace("#", "%23").replace("?", "%3F"))


def containers(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner)


JSON_VALUE = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    containers,
    max_leaves=8,
)
BODY = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["a.b", "chat.message", "Bad", "", 5])},
        optional={
            "data": JSON_VALUE,
            "idempotency_key": st.one_of(st.none(), st.text(max_size=3), st.just("k" * 201)),
            "extra": st.integers(),
        },
    ).map(lambda d: json.dumps(d).encode()),
    JSON_VALUE.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=20),
)


@hypothesis_settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(channel=CHANNEL, body=BODY, content_type=st.sampled_from(["application/json", None]))
async def test_any_request_gets_the_routes_answer(
    http: httpx.AsyncClient,
    route_http: httpx.AsyncClient,
    admin: Account,
    channel: str,
    body: bytes,
    content_type: str | None,
) -> None:
    headers = {**admin.headers, **({"Content-Type": content_type} if content_type else {})}
    await both(http, route_http, events_url(channel), headers=headers, content=body)


# JSON text with the cases parsers disagree on: escapes, surrogates, odd numbers, a BOM,
# control characters, duplicate keys, trailing bytes.
STRUCTURE = ['{"type":"a.b"', ',"data":', ',"type":"c.d"', "}", "[", "]", ",", ":", "\\"]
NUMBERS = ["1", "-0", "1e400", "01", "NaN", "Infinity", "1.5e-3", "null", "true"]
STRINGS = ['"\\ud800"', '"\\udc00\\ud800"', '"\\u00e9"', '"\x01"', '"é"', '"x"']
SPACES = [" ", "\t", "\x0c", "\ufeff"]
PIECE = st.sampled_from([*STRUCTURE, *NUMBERS, *STRINGS, *SPACES])


@hypothesis_settings(max_examples=500, deadline=None)
@given(text=st.lists(PIECE, max_size=8).map("".join), encoding=st.sampled_from(["utf-8", "utf-16"]))
def test_pydantic_accepts_only_what_the_json_module_reads_the_same(
    text: str, encoding: str
) -> None:
    """The fast path validates bodies straight from the bytes; FastAPI parses them with the
    `json` module first. What pydantic accepts must read the same both ways (whatever it
    refuses, the fast path parses as FastAPI does)."""
    raw = text.encode(encoding, "surrogatepass")
    try:
        fast = PublishRequest.model_validate_json(raw)
    except ValidationError:
        return
    slow = PublishRequest.model_validate(json.loads(raw), from_attributes=True)
    assert repr(slow) == repr(fast)  # repr: NaN equals itself

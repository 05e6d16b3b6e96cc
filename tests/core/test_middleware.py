"""The request-context middleware tells its observers of every answered request, over real
HTTP: a failing observer is logged and the others still run, and a body refused as too
large before the app is reached is observed too."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from apix.core.logging import configure_logging
from apix.core.middleware import RequestContextMiddleware
from tests.conftest import LiveServer, Servers, make_settings, serve_app

Seen = list[tuple[str, int]]


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"hello"})


@pytest.fixture
async def observed(servers: Servers) -> AsyncIterator[tuple[LiveServer, Seen]]:
    seen: Seen = []

    def broken(scope: Scope, status: int, seconds: float) -> None:
        raise RuntimeError("this observer is broken")

    def recording(scope: Scope, status: int, seconds: float) -> None:
        assert seconds >= 0
        seen.append((scope["path"], status))

    settings = make_settings(servers)
    configure_logging(settings.log)  # as `create_app` does
    app: Any = RequestContextMiddleware(hello, max_body_bytes=10, on_response=[broken, recording])
    async with serve_app(app, settings) as server:
        yield server, seen


async def test_a_failing_observer_is_logged_and_the_others_still_run(
    observed: tuple[LiveServer, Seen], caplog: pytest.LogCaptureFixture
) -> None:
    server, seen = observed
    async with httpx.AsyncClient(base_url=server.http) as http:
        with caplog.at_level(logging.ERROR):
            first = await http.get("/one")
            second = await http.get("/two")  # the same keep-alive connection
    assert (first.status_code, first.text, second.status_code) == (200, "hello", 200)
    assert seen == [("/one", 200), ("/two", 200)]
    failures = [
        r
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "a response observer failed"
    ]
    assert len(failures) == 2


async def test_a_body_refused_before_the_app_is_observed(
    observed: tuple[LiveServer, Seen],
) -> None:
    server, seen = observed
    async with httpx.AsyncClient(base_url=server.http) as http:
        response = await http.post("/upload", content=b"x" * 11)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"
    assert seen == [("/upload", 413)]

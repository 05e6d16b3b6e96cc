"""Every HTTP error has the shape {"error": {"code", "message", "details"}}."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from apix.app import create_app
from apix.config import Settings
from apix.core.errors import Conflict


class Widget(BaseModel):
    name: str
    size: int


@pytest.fixture
async def probe(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The real app plus three routes that exercise request parsing and failures."""
    app: FastAPI = create_app(
        settings.model_copy(
            update={"server": settings.server.model_copy(update={"max_body_bytes": 1024})}
        )
    )

    @app.post("/probe/widgets")
    async def create_widget(widget: Widget) -> Widget:
        return widget

    @app.get("/probe/conflict")
    async def conflict() -> None:
        raise Conflict("widget exists", details={"name": "w"})

    @app.get("/probe/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals")

    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            yield http


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


async def test_malformed_json_is_400(probe: httpx.AsyncClient) -> None:
    response = await probe.post(
        "/probe/widgets", content=b'{"name": "a", ', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "malformed_json")


async def test_wrong_type_is_422_with_field_paths(probe: httpx.AsyncClient) -> None:
    response = await probe.post("/probe/widgets", json={"name": "a", "size": "big"})
    error = assert_error(response, 422, "validation_error")
    assert error["details"] == [
        {
            "loc": ["body", "size"],
            "message": "Input should be a valid integer, unable to parse string as an integer",
            "type": "int_parsing",
        }
    ]


async def test_missing_field_is_422(probe: httpx.AsyncClient) -> None:
    response = await probe.post("/probe/widgets", json={"name": "a"})
    error = assert_error(response, 422, "validation_error")
    assert error["details"][0]["loc"] == ["body", "size"]  # type: ignore[index]


async def test_unknown_route_is_404(probe: httpx.AsyncClient) -> None:
    assert_error(await probe.get("/api/v1/nothing-here"), 404, "not_found")


async def test_wrong_method_is_405(probe: httpx.AsyncClient) -> None:
    response = await probe.delete("/api/v1/status")
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


async def test_too_large_body_is_413(probe: httpx.AsyncClient) -> None:
    response = await probe.post("/probe/widgets", json={"name": "x" * 2000, "size": 1})
    assert_error(response, 413, "too_large")


async def test_too_large_chunked_body_is_413(probe: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    response = await probe.post("/probe/widgets", content=chunks())
    assert_error(response, 413, "too_large")


async def test_domain_error_is_rendered_with_its_status(probe: httpx.AsyncClient) -> None:
    error = assert_error(await probe.get("/probe/conflict"), 409, "conflict")
    assert error == {"code": "conflict", "message": "widget exists", "details": {"name": "w"}}


async def test_unexpected_error_is_500_without_internals_and_logged_with_request_id(
    probe: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = await probe.get("/probe/boom", headers={"X-Request-ID": "req-500-test"})
    error = assert_error(response, 500, "internal")
    assert "secret internals" not in response.text
    assert "Traceback" not in response.text
    assert error["details"] == {"request_id": "req-500-test"}
    assert response.headers["x-request-id"] == "req-500-test"
    logged = [
        r
        for r in caplog.records
        if isinstance(r.msg, dict) and r.msg.get("event") == "unhandled error"
    ]
    assert logged, caplog.records
    assert logged[0].msg["request_id"] == "req-500-test"  # type: ignore[index]
    assert logged[0].exc_info is not None


async def test_request_id_is_echoed_or_generated(probe: httpx.AsyncClient) -> None:
    given = await probe.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert given.headers["x-request-id"] == "abc-123"
    generated = await probe.get("/healthz")
    assert len(generated.headers["x-request-id"]) == 32
    hostile = await probe.get("/healthz", headers={"X-Request-ID": "bad id\twith spaces"})
    assert hostile.headers["x-request-id"] != "bad id\twith spaces"


async def test_every_log_line_of_a_request_carries_its_request_id(
    probe: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        await probe.get("/api/v1/status", headers={"X-Request-ID": "trace-me"})
    lines = [
        r.msg for r in caplog.records if isinstance(r.msg, dict) and r.msg.get("event") == "request"
    ]
    assert lines
    assert lines[-1]["request_id"] == "trace-me"
    assert lines[-1]["status"] == 200
    assert json.dumps(lines[-1])  # a JSON-serialisable line

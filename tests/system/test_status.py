"""API root, status, liveness and readiness, over HTTP."""

from __future__ import annotations

import httpx
import pytest

from apix import __version__
from apix.app import create_app
from apix.infra.migrate import head_revision
from tests.conftest import Servers, make_settings


async def test_api_root_links_everything(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1")
    assert response.status_code == 200
    body = response.json()
    assert body["name"] == "APIX"
    assert body["version"] == __version__
    assert body["links"] == {
        "docs": "http://apix.test/api/docs",
        "redoc": "http://apix.test/api/redoc",
        "openapi": "http://apix.test/api/openapi.json",
        "status": "http://apix.test/api/v1/status",
        "websocket": "ws://apix.test/api/v1/apix/ws",
    }


async def test_status_reports_both_servers_and_the_schema(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/v1/status")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["node_id"] == "test-node"
    assert body["version"] == __version__
    assert body["uptime_s"] >= 0
    for name in ("postgres", "redis"):
        component = body[name]
        assert component["ok"] is True, component
        assert component["latency_ms"] > 0
        assert component["version"]
        assert component["embedded"] is False  # not started by `apix serve`
    assert body["postgres"]["version"].split(".")[0] in {"15", "16", "17"}
    assert body["migrations"] == {
        "current": head_revision(),
        "head": head_revision(),
        "up_to_date": True,
    }


async def test_healthz_answers_without_io(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_when_everything_answers(client: httpx.AsyncClient) -> None:
    response = await client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"ready": True, "reasons": []}


@pytest.mark.parametrize(
    ("override", "reason"),
    [
        ({"database_url": "postgresql://postgres@127.0.0.1:1/nowhere"}, "postgres unreachable"),
        ({"redis_url": "redis://127.0.0.1:1/0"}, "redis unreachable"),
    ],
)
async def test_readyz_is_503_with_reasons_when_a_server_is_down(
    servers: Servers, override: dict[str, str], reason: str
) -> None:
    app = create_app(make_settings(servers, **override))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            ready = await http.get("/readyz")
            status = await http.get("/api/v1/status")
            alive = await http.get("/healthz")
    assert ready.status_code == 503
    assert any(r.startswith(reason) for r in ready.json()["reasons"]), ready.json()
    assert status.status_code == 200
    assert status.json()["status"] == "degraded"
    assert alive.status_code == 200


async def test_readyz_is_503_until_migrations_are_current(
    servers: Servers, owner_engine: object
) -> None:
    from sqlalchemy import text

    async with owner_engine.begin() as conn:  # type: ignore[attr-defined]
        await conn.execute(text("UPDATE alembic_version SET version_num = 'older'"))
    try:
        app = create_app(make_settings(servers))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                ready = await http.get("/readyz")
    finally:
        async with owner_engine.begin() as conn:  # type: ignore[attr-defined]
            await conn.execute(
                text("UPDATE alembic_version SET version_num = :v"), {"v": head_revision()}
            )
    assert ready.status_code == 503
    assert ready.json()["reasons"] == [
        f"migrations not current: at older, head is {head_revision()} (run `apix migrate upgrade`)"
    ]


async def test_docs_are_served_without_any_cdn(client: httpx.AsyncClient) -> None:
    for path in ("/api/docs", "/api/redoc"):
        page = await client.get(path)
        assert page.status_code == 200
        assert "/api/static/" in page.text
        assert "http://" not in page.text, path
        assert "https://" not in page.text, path
    for asset in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"):
        response = await client.get(f"/api/static/{asset}")
        assert response.status_code == 200, asset
        assert len(response.content) > 10_000


async def test_openapi_describes_the_api(client: httpx.AsyncClient) -> None:
    response = await client.get("/api/openapi.json")
    assert response.status_code == 200
    spec = response.json()
    assert spec["info"]["title"] == "APIX"
    assert "/api/v1/status" in spec["paths"]
    assert spec["paths"]["/api/v1/status"]["get"]["summary"].startswith("Version, node")

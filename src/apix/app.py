"""The ASGI application: routers, middleware, error handlers and the resource lifespan."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.routing import WebSocketRoute
from starlette.types import ASGIApp, Receive, Scope, Send

from apix import __version__
from apix.agents import openai_compat
from apix.agents import router as agents_router
from apix.analytics import router as analytics_router
from apix.analytics.rollup import ApiUsage
from apix.audit import router as audit_router
from apix.config import Settings, get_settings
from apix.core.errors import ErrorResponse
from apix.core.gc import settle as settle_gc
from apix.core.handlers import install_error_handlers
from apix.core.json import ORJSONResponse
from apix.core.logging import configure_logging, get_logger
from apix.core.middleware import RequestContextMiddleware
from apix.identity import admin_router
from apix.identity import router as identity_router
from apix.identity.runtime import IdentityRuntime
from apix.infra.database import Database
from apix.infra.migrate import head_revision
from apix.infra.redis import create_redis
from apix.monitoring import router as monitoring_router
from apix.monitoring.http import latency_observer
from apix.monitoring.runtime import MonitoringRuntime
from apix.providers import router as providers_router
from apix.realtime import router as realtime_router
from apix.realtime.fastpath import PublishFastPath
from apix.realtime.gateway import Gateway
from apix.system.router import router as system_router
from apix.worker import Workers

log = get_logger(__name__)

# Set by `apix serve` for the node processes it starts: which servers it embedded.
EMBEDDED_ENV = "APIX_EMBEDDED_SERVERS"

WS_PATH = "/api/v1/apix/ws"

_DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
_STATIC_URL = "/api/static"


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.database_url is None or settings.redis_url is None:
            raise RuntimeError(
                "APIX_DATABASE_URL and APIX_REDIS_URL are not set: start the node with "
                "`apix serve`, which runs embedded servers when none are configured"
            )
        database = Database(settings.database_url, settings.database)
        redis = create_redis(settings.redis_url, settings.redis)
        app.state.database = database
        app.state.redis = redis
        app.state.identity = identity = IdentityRuntime.create(settings, database, redis)
        app.state.gateway = gateway = Gateway(settings, identity, redis)
        app.state.monitoring = monitoring = MonitoringRuntime(settings, database, redis, gateway)
        workers = None
        if settings.worker.embedded:
            name = f"{settings.node_id}:{os.getpid()}"
            workers = Workers(settings, database, redis, gateway.broker, name=name)
        app.state.workers = workers
        identity.start()  # watches revocations; retries by itself while Redis is down
        try:
            await identity.resync()
            await gateway.start()
            await monitoring.start()
            if workers is not None:
                await workers.start()
            app.state.api_usage.start(database)
            if settings.server.gc_freeze:
                settle_gc()
        except Exception:
            # A node must still start (and report not ready) when a server is down or the
            # schema is behind; `/readyz` says why.
            log.warning("could not start every background service", exc_info=True)
        try:
            yield
        finally:
            await app.state.api_usage.stop(database)
            if workers is not None:
                await workers.stop()
            await monitoring.stop()
            await gateway.stop()
            await identity.stop()
            await redis.aclose()
            await database.dispose()

    app = _Apix(
        title="APIX",
        version=__version__,
        summary="Multi-tenant, real-time-first backend for AI-agent products.",
        openapi_url="/api/openapi.json",
        docs_url=None,
        redoc_url=None,
        default_response_class=ORJSONResponse,
        responses={"default": {"model": ErrorResponse, "description": "Error"}},
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.started_at = time.monotonic()
    app.state.head_revision = head_revision()
    app.state.embedded = frozenset(filter(None, os.environ.get(EMBEDDED_ENV, "").split(",")))

    install_error_handlers(app)
    if settings.server.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.server.allowed_origins,
            allow_methods=["*"],
            allow_headers=["*"],
            expose_headers=["X-Request-ID", "X-APIX-Run-Id", "X-APIX-Session-Id"],
            max_age=600,
        )
    app.state.api_usage = api_usage = ApiUsage()
    app.add_middleware(
        RequestContextMiddleware,
        max_body_bytes=settings.server.max_body_bytes,
        on_response=[latency_observer(app.state), api_usage.observe],
    )
    app.publish = PublishFastPath(fastapi=app)
    app.include_router(system_router)
    app.include_router(identity_router.router)
    app.include_router(identity_router.keys_router)
    app.include_router(admin_router.router)
    app.include_router(realtime_router.router)
    app.include_router(agents_router.router)
    app.include_router(openai_compat.router)
    app.include_router(analytics_router.router)
    app.include_router(audit_router.router)
    app.include_router(providers_router.router)
    app.include_router(monitoring_router.router)
    app.include_router(monitoring_router.metrics_router)
    app.router.routes.append(WebSocketRoute(WS_PATH, _WebSocketEndpoint(app)))
    _mount_docs(app)
    return app


class _Apix(FastAPI):
    """FastAPI, except that two hot paths skip what they do not need.

    - WebSocket upgrades to the gateway go straight to it. They need none of the HTTP
      middleware, and matching them against every route cost about a tenth of the CPU of a
      connect in the benchmark's profile. Taking them here, not in a middleware, also keeps
      the middleware's suspended frames out of every open connection's memory. The route
      stays registered for anything that looks it up.
    - HTTP publish goes to its fast path (`apix.realtime.fastpath`) inside APIX's own
      middleware (request context, CORS: built from `user_middleware`, so with the same
      classes and settings), without the layers FastAPI and Starlette put around them,
      which have nothing to do for it and cost a wrapper each for every message of every
      request. FastAPI's own OpenTelemetry is the exception: when a tracing, metrics or
      logs provider is configured, publish takes FastAPI's path, traced like any route.
    """

    publish: PublishFastPath | None = None  # set by `create_app`
    _publish_stack: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if self.root_path:  # as `FastAPI.__call__` sets it
                scope["root_path"] = self.root_path
            if self.publish is not None and self.publish.take(scope) and not self._traced():
                await self._published(scope, receive, send)
                return
        elif kind == "websocket" and scope["path"] in (
            WS_PATH,
            scope.get("root_path", "") + WS_PATH,
        ):
            await self.state.gateway(scope, receive, send)
            return
        await super().__call__(scope, receive, send)

    def _traced(self) -> bool:
        # FastAPI asks the same on every request (it may be configured once serving).
        telemetry = getattr(self, "_native_telemetry", None)
        return telemetry is not None and bool(telemetry.enabled())

    async def _published(self, scope: Scope, receive: Receive, send: Send) -> None:
        stack = self._publish_stack
        if stack is None:  # built on first use, as Starlette builds its own stack
            stack = cast(ASGIApp, self.publish)
            for cls, args, kwargs in reversed(self.user_middleware):
                stack = cls(stack, *args, **kwargs)
            self._publish_stack = stack
        scope["app"] = self  # as `Starlette.__call__` sets it
        await stack(scope, receive, send)


class _WebSocketEndpoint:
    """The APIX WebSocket endpoint: the node's gateway, reached once the lifespan made it."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app.state.gateway(scope, receive, send)


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI and ReDoc served from an installed package: no CDN, works offline."""
    app.mount(_STATIC_URL, StaticFiles(directory=_DOCS_ASSETS), name="docs-static")

    @app.get("/api/docs", include_in_schema=False)
    async def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_swagger_ui_html(
            openapi_url=f"{root}/api/openapi.json",
            title="APIX API",
            swagger_js_url=f"{root}{_STATIC_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{_STATIC_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{_STATIC_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},
        )

    @app.get("/api/redoc", include_in_schema=False)
    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return get_redoc_html(
            openapi_url=f"{root}/api/openapi.json",
            title="APIX API",
            redoc_js_url=f"{root}{_STATIC_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{_STATIC_URL}/favicon.png",
            with_google_fonts=False,
        )

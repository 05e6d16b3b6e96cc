"""HTTP publish without FastAPI's routing and dependency solving: the hot path of
`POST /api/v1/apix/channels/{channel}/events`, answered exactly as the route it shadows.
"""

from __future__ import annotations

import email.message
import inspect
import json
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import HTTPExceptionHandler, Receive, Scope, Send

from apix.core.errors import Unauthorized
from apix.core.json import dumps
from apix.identity import service as identity
from apix.identity.deps import credential_from
from apix.identity.principal import Principal
from apix.realtime import channels as channel_registry
from apix.realtime import router as realtime_router
from apix.realtime import service
from apix.realtime.schemas import PublishRequest

__all__ = ["PublishFastPath"]

_JSON_HEADER = (b"content-type", b"application/json")
_NO_BODY = object()  # an empty request body: FastAPI reports the body as missing


class PublishFastPath:
    """The ASGI app that answers HTTP publish, taken by the application before FastAPI's
    middleware stack (`apix.app`) and wrapped in APIX's own middleware only: request context,
    latency and CORS.

    What it skips is FastAPI's route matching over every route, dependency solving and
    validating the result twice (about 60% of a publish's CPU in the benchmark's profile), and
    the outer layers Starlette and FastAPI put around every app (server errors, exception
    telemetry, body limits), which have nothing to do here: the request-context middleware
    limits bodies and answers unhandled errors. The FastAPI route stays registered, so
    OpenAPI documents it; tests compare both answer for answer.
    """

    def __init__(self, *, fastapi: FastAPI) -> None:
        self.fastapi = fastapi
        self.route = _publish_route()
        self.path = self.route.path_regex  # the route's own pattern: the same matches

    def take(self, scope: Scope) -> bool:
        """Whether this is an HTTP publish; if so, the scope gets the route and its channel,
        as Starlette's routing would set them (the latency observer labels requests with
        `scope["route"].path`)."""
        if scope["method"] != "POST":
            return False
        match = self.path.match(_route_path(scope))
        if match is None:
            return False
        scope["route"] = self.route
        scope["path_params"] = {"channel": match["channel"]}
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer a request `take` took."""
        await self._publish(Request(scope, receive), scope["path_params"]["channel"], send)

    async def _publish(self, request: Request, channel: str, send: Send) -> None:
        try:
            body = await self._result(request, channel)
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # the request-context middleware logs it and answers 500
            response = handler(request, exc)
            if inspect.isawaitable(response):
                response = await response
            await response(request.scope, request.receive, send)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 201,
                "headers": [(b"content-length", str(len(body)).encode()), _JSON_HEADER],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _result(self, request: Request, channel: str) -> bytes:
        # FastAPI's order: the body is read (and JSON errors raised) before the caller is
        # authenticated, and validated after.
        event = await _read_event(request)
        principal = await self._authenticate(request)
        if not isinstance(event, PublishRequest):
            event = _validate(event)
        ref = channel_registry.parse(channel, principal)
        channel_registry.check_publish(principal, ref, http=True)
        result = await service.publish(
            self.fastapi.state.gateway.broker,
            principal,
            ref,
            event.type,
            event.data,
            idempotency_key=event.idempotency_key,
        )
        return dumps(result)  # the `PublishResult` fields, already of their types

    async def _authenticate(self, request: Request) -> Principal:
        credential = credential_from(request)
        if credential is None:
            raise Unauthorized("a bearer token or API key is required")
        principal = await identity.authenticate(self.fastapi.state.identity, credential)
        if principal.api_key_id is not None and principal.org_id is not None:
            # Counted per key by the access middleware once the response is sent (analytics).
            request.state.api_key = (principal.org_id, principal.api_key_id)
        return principal

    def _handler(self, exc: Exception) -> HTTPExceptionHandler | None:
        # The app's handler for the nearest class, as Starlette's ExceptionMiddleware picks it.
        handlers = self.fastapi.exception_handlers
        for cls in type(exc).__mro__:
            if cls in handlers:
                return handlers[cls]
        return None


async def _read_event(request: Request) -> Any:
    """The body as FastAPI reads it for the route: a `PublishRequest` when it is valid JSON
    (the common case, validated straight from the bytes), else what FastAPI would validate,
    with the same errors for a body that cannot be read or parsed."""
    try:
        body = await request.body()
        if not body:
            return _NO_BODY
        content_type = request.headers.get("content-type")
        if content_type != "application/json" and not _is_json(content_type):
            return body  # not parsed; fails validation as FastAPI's route does
        try:
            return PublishRequest.model_validate_json(body)
        except ValidationError:
            # Bodies pydantic refuses are parsed as FastAPI parses them: the standard
            # library's `json` accepts a few more (a BOM, lone surrogates) and its errors
            # are the ones reported.
            return json.loads(body)
    except json.JSONDecodeError as exc:
        raise RequestValidationError(
            [
                {
                    "type": "json_invalid",
                    "loc": ("body", exc.pos),
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ],
            body=exc.doc,
        ) from exc
    except HTTPException:
        raise  # e.g. the body limit of the request-context middleware: 413
    except Exception as exc:
        raise HTTPException(400, "There was an error parsing the body") from exc


def _is_json(content_type: str | None) -> bool:
    """FastAPI's test: `application/json` or `application/*+json`; no content type is not
    JSON (its strict content-type default)."""
    if not content_type:
        return False
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (
        subtype == "json" or subtype.endswith("+json")
    )


def _validate(body: Any) -> PublishRequest:
    """Validate as FastAPI validates the route's body, so errors read the same."""
    if body is _NO_BODY:
        missing = {"type": "missing", "loc": ("body",), "msg": "Field required", "input": None}
        raise RequestValidationError([missing])
    try:
        return PublishRequest.model_validate(body, from_attributes=True)
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors(include_url=False)]
        raise RequestValidationError(errors, body=body) from None


def _route_path(scope: Scope) -> str:
    """The path as Starlette's routing matches it: without `root_path` when the server
    kept it in `path`."""
    path: str = scope["path"]
    root: str = scope.get("root_path", "")
    if not root or not path.startswith(root):
        return path
    if path == root:
        return ""
    return path[len(root) :] if path[len(root)] == "/" else path


def _publish_route() -> APIRoute:
    for route in realtime_router.router.routes:
        if isinstance(route, APIRoute) and route.endpoint is realtime_router.publish:
            return route
    raise LookupError("the HTTP publish route is not registered")

"""The gateway's HTTP API (PROTOCOL.md section 8) and the SSE endpoint."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from fastapi import Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from apix.audit import service as audit
from apix.core.errors import ErrorResponse, NotFound, Unauthorized
from apix.core.routing import api_router
from apix.identity import service as identity
from apix.identity.deps import CurrentPrincipal, Meta, credential_from, require
from apix.identity.principal import Principal
from apix.realtime import channels as channel_registry
from apix.realtime import service
from apix.realtime.gateway import Gateway
from apix.realtime.schemas import (
    ConnectionOut,
    DeadLetterOut,
    DeadLetterPage,
    HistoryResult,
    PresenceResult,
    PublishRequest,
    PublishResult,
)
from apix.realtime.sse import open_stream, parse_position

_ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
}
router = api_router(prefix="/api/v1/apix", tags=["realtime"], responses=_ERRORS)


async def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


GatewayDep = Annotated[Gateway, Depends(_gateway)]
OffsetQuery = Annotated[str | None, Query(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]


@router.post("/channels/{channel}/events", status_code=status.HTTP_201_CREATED)
async def publish(
    channel: str, data: PublishRequest, principal: CurrentPrincipal, gateway: GatewayDep
) -> PublishResult:
    """Publish an event to a channel of the caller's organisation."""
    ref = channel_registry.parse(channel, principal)
    channel_registry.check_publish(principal, ref, http=True)
    result = await service.publish(
        gateway.broker, principal, ref, data.type, data.data, idempotency_key=data.idempotency_key
    )
    return PublishResult.model_validate(result)


@router.get("/channels/{channel}/events")
async def history(
    channel: str,
    principal: CurrentPrincipal,
    gateway: GatewayDep,
    since: OffsetQuery = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    reverse: bool = False,
) -> HistoryResult:
    """Events kept for replay: after `since`, or the newest `limit`."""
    ref = channel_registry.parse(channel, principal)
    channel_registry.check_subscribe(principal, ref)
    result = await service.history(
        gateway.broker,
        ref,
        since=since,
        limit=limit,
        reverse=reverse,
        recover=gateway.recover_from_archive,
    )
    return HistoryResult.model_validate(result)


@router.get("/channels/{channel}/presence")
async def presence(
    channel: str, principal: CurrentPrincipal, gateway: GatewayDep
) -> PresenceResult:
    """Who is on the channel now (connections that subscribed with presence)."""
    ref = channel_registry.parse(channel, principal)
    channel_registry.check_subscribe(principal, ref)
    return PresenceResult.model_validate({"clients": await gateway.presence.members(ref)})


@router.get("/connections")
async def list_connections(
    principal: Annotated[Principal, Depends(require("apix:admin"))], gateway: GatewayDep
) -> list[ConnectionOut]:
    """The organisation's live connections, on every node."""
    assert principal.org_id is not None  # noqa: S101 - `require` ensures an organisation
    return [
        ConnectionOut.model_validate(r) for r in await gateway.registry.list_org(principal.org_id)
    ]


@router.delete("/connections/{connection_id}", status_code=status.HTTP_204_NO_CONTENT)
async def kick_connection(
    connection_id: str,
    principal: Annotated[Principal, Depends(require("apix:admin"))],
    gateway: GatewayDep,
    meta: Meta,
) -> Response:
    """Disconnect one connection (close 4010), whichever node holds it."""
    assert principal.org_id is not None  # noqa: S101
    if await gateway.registry.find(principal.org_id, connection_id) is None:
        raise NotFound("no such connection")
    async with gateway.identity.database.transaction(principal.org_id) as uow:
        await audit.record(
            uow,
            "realtime.connection.kicked",
            meta=meta,
            org_id=principal.org_id,
            by=principal,
            target_type="apix_connection",
            target_id=connection_id,
        )
    await gateway.registry.kick(connection_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


AdminPrincipal = Annotated[Principal, Depends(require("apix:admin"))]


@router.get("/dead-letters")
async def list_dead_letters(
    principal: AdminPrincipal,
    request: Request,
    channel: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    status_: Annotated[
        Literal["pending", "redelivered", "discarded"] | None, Query(alias="status")
    ] = None,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> DeadLetterPage:
    """Events that exhausted their delivery attempts, newest first (cursor pagination)."""
    assert principal.org_id is not None  # noqa: S101
    page = await service.dead_letters(
        request.app.state.database,
        principal.org_id,
        channel=channel,
        since=since,
        until=until,
        status=status_,
        cursor=cursor,
        limit=limit,
    )
    return DeadLetterPage.model_validate(page)


@router.post("/dead-letters/{dead_letter_id}/redeliver")
async def redeliver_dead_letter(
    dead_letter_id: uuid.UUID, principal: AdminPrincipal, request: Request, gateway: GatewayDep
) -> DeadLetterOut:
    """Publish a dead-lettered event to its channel again (marked `redelivered`)."""
    row = await service.resolve_dead_letter(
        request.app.state.database, gateway.broker, principal, dead_letter_id, redeliver=True
    )
    return DeadLetterOut.model_validate(row)


@router.delete("/dead-letters/{dead_letter_id}")
async def discard_dead_letter(
    dead_letter_id: uuid.UUID, principal: AdminPrincipal, request: Request, gateway: GatewayDep
) -> DeadLetterOut:
    """Discard a dead letter (marked `discarded`, kept for the record)."""
    row = await service.resolve_dead_letter(
        request.app.state.database, gateway.broker, principal, dead_letter_id, redeliver=False
    )
    return DeadLetterOut.model_validate(row)


@router.get(
    "/sse",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def sse(
    request: Request,
    gateway: GatewayDep,
    channel: Annotated[list[str], Query()],
    since: Annotated[list[str] | None, Query()] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Receive channels' events as Server-Sent Events (resume with `Last-Event-ID`).

    Browsers' `EventSource` cannot set headers: it may pass the token as `access_token`.
    """
    credential = credential_from(request) or request.query_params.get("access_token")
    if not credential:
        raise Unauthorized("a bearer token or API key is required")
    mark = gateway.revocation_mark  # a revocation from here on ends the stream too
    principal = await identity.authenticate(request.app.state.identity, credential)
    positions = dict(parse_position(value) for value in since or [])
    if last_event_id:
        name, position = parse_position(last_event_id)
        positions[name] = position
    stream = await open_stream(gateway, principal, channel, positions, mark=mark)
    return StreamingResponse(
        stream,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )

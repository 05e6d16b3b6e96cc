"""Agents, versions and runs (`/api/v1/agents`, `/api/v1/runs`), and conversation sessions
(`/api/v1/sessions`)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Header, Query, Request, Response, status
from fastapi.responses import StreamingResponse

from apix.agents import service
from apix.agents.schemas import (
    TERMINAL,
    AgentCreate,
    AgentRead,
    AgentUpdate,
    RunCreate,
    RunPage,
    RunRead,
    SessionCreate,
    SessionDetail,
    SessionRead,
    SessionUpdate,
    VersionRead,
)
from apix.agents.service import AgentsRuntime
from apix.core.errors import ErrorResponse
from apix.core.routing import api_router
from apix.identity.deps import Meta, require
from apix.identity.principal import Principal
from apix.realtime.gateway import Gateway
from apix.realtime.schemas import Position
from apix.realtime.sse import open_stream, parse_position

_ERRORS = {
    400: {"model": ErrorResponse},
    401: {"model": ErrorResponse},
    403: {"model": ErrorResponse},
    404: {"model": ErrorResponse},
    409: {"model": ErrorResponse},
    422: {"model": ErrorResponse},
}

router = api_router(prefix="/api/v1", tags=["agents"], responses=_ERRORS)

Reader = Annotated[Principal, Depends(require("agents:read"))]
Writer = Annotated[Principal, Depends(require("agents:write"))]
_NO_CONTENT = status.HTTP_204_NO_CONTENT


async def _runtime(request: Request) -> AgentsRuntime:
    state = request.app.state
    return AgentsRuntime(state.database, state.redis, state.gateway.broker)


Runtime = Annotated[AgentsRuntime, Depends(_runtime)]


@router.post("/agents", status_code=status.HTTP_201_CREATED)
async def create_agent(data: AgentCreate, principal: Writer, rt: Runtime, meta: Meta) -> AgentRead:
    """Create an agent (its draft); publish it to make runs possible."""
    return await service.create_agent(rt, principal, data, meta)


@router.get("/agents")
async def list_agents(principal: Reader, rt: Runtime) -> list[AgentRead]:
    """The organisation's agents."""
    return await service.list_agents(rt, principal)


@router.get("/agents/{agent_id}")
async def get_agent(agent_id: uuid.UUID, principal: Reader, rt: Runtime) -> AgentRead:
    """One agent with its draft."""
    return await service.get_agent(rt, principal, agent_id)


@router.patch("/agents/{agent_id}")
async def update_agent(
    agent_id: uuid.UUID, data: AgentUpdate, principal: Writer, rt: Runtime, meta: Meta
) -> AgentRead:
    """Edit the draft (published versions never change)."""
    return await service.update_agent(rt, principal, agent_id, data, meta)


@router.delete("/agents/{agent_id}", status_code=_NO_CONTENT)
async def delete_agent(agent_id: uuid.UUID, principal: Writer, rt: Runtime, meta: Meta) -> Response:
    """Delete an agent with its versions, sessions and runs."""
    await service.delete_agent(rt, principal, agent_id, meta)
    return Response(status_code=_NO_CONTENT)


@router.post("/agents/{agent_id}/publish", status_code=status.HTTP_201_CREATED)
async def publish_agent(
    agent_id: uuid.UUID, principal: Writer, rt: Runtime, meta: Meta
) -> VersionRead:
    """Freeze the draft as the next version."""
    return await service.publish_agent(rt, principal, agent_id, meta)


@router.get("/agents/{agent_id}/versions")
async def list_versions(agent_id: uuid.UUID, principal: Reader, rt: Runtime) -> list[VersionRead]:
    """Every published version, oldest first."""
    return await service.list_versions(rt, principal, agent_id)


@router.post(
    "/agents/{agent_id}/runs",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        200: {"description": "an idempotent retry (the first run), or the SSE stream"},
        202: {"model": RunRead},
    },
    response_model=None,
)
async def create_run(
    request: Request,
    agent_id: uuid.UUID,
    data: RunCreate,
    principal: Writer,
    rt: Runtime,
    meta: Meta,
    response: Response,
    last_event_id: Annotated[str | None, Header()] = None,
) -> RunRead | StreamingResponse:
    """Queue a run (202 with the run), or with `stream: true` follow it as SSE (200).

    The run goes on when the client disconnects; an SSE client resumes with
    `Last-Event-ID`. A retry with the same `idempotency_key` returns the first run (200).
    """
    gateway: Gateway = request.app.state.gateway
    assert principal.org_id is not None  # noqa: S101 - `require` ensures an organisation
    follow = (
        service.session_channel(principal.org_id, data.session_id)
        if data.session_id is not None
        else service.agent_channel(principal.org_id, agent_id)
    )
    before = await gateway.broker.read(follow)
    run, new = await service.create_run(rt, principal, agent_id, data, meta)
    if not data.stream:
        response.status_code = status.HTTP_202_ACCEPTED if new else status.HTTP_200_OK
        return run
    position = Position(offset=before.last_offset, epoch=before.epoch)
    if last_event_id:
        _, position = parse_position(last_event_id)
    return _follow(gateway, principal, run, follow.name, position)


@router.get("/agents/{agent_id}/runs")
async def list_runs(
    agent_id: uuid.UUID,
    principal: Reader,
    rt: Runtime,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> RunPage:
    """The agent's runs, newest first."""
    return await service.list_runs(rt, principal, agent_id, limit=limit, cursor=cursor)


@router.get("/runs/{run_id}")
async def get_run(run_id: uuid.UUID, principal: Reader, rt: Runtime) -> RunRead:
    """A run: status, input, output, usage, timings, error."""
    return await service.get_run(rt, principal, run_id)


@router.get(
    "/runs/{run_id}/events",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}},
)
async def follow_run(
    request: Request,
    run_id: uuid.UUID,
    principal: Reader,
    rt: Runtime,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    """Follow a run as SSE from its start (or from `Last-Event-ID`) until it ends."""
    gateway: Gateway = request.app.state.gateway
    run = await service.get_run(rt, principal, run_id)
    if last_event_id:
        _, position = parse_position(last_event_id)
    else:
        position = Position(offset="0-0", epoch=None)
    return _follow(gateway, principal, run, run.channel, position)


@router.post("/runs/{run_id}/cancel")
async def cancel_run(run_id: uuid.UUID, principal: Writer, rt: Runtime, meta: Meta) -> RunRead:
    """Cancel a run: at once when queued, within a second when running."""
    return await service.cancel_run(rt, principal, run_id, meta)


def _follow(
    gateway: Gateway, principal: Principal, run: RunRead, channel: str, position: Position
) -> StreamingResponse:
    return StreamingResponse(
        _run_events(gateway, principal, run, channel, position),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


_ENDINGS = frozenset(f"event: agent.run.{s}" for s in TERMINAL)


async def _run_events(
    gateway: Gateway, principal: Principal, run: RunRead, channel: str, position: Position
) -> AsyncIterator[str]:
    """The channel's SSE stream, reduced to this run's events, until the run ends."""
    marker = f'"run_id":"{run.id}"'
    # Ended, as any APIX SSE stream, when the caller's credential is revoked.
    mark = gateway.revocation_mark
    stream = await open_stream(gateway, principal, [channel], {channel: position}, mark=mark)
    async for chunk in stream:
        for part in chunk.split("\n\n"):
            if not part:
                continue
            if part.startswith(":"):
                yield part + "\n\n"
                continue
            if marker not in part:
                continue
            yield part + "\n\n"
            lines = part.split("\n", 2)
            if len(lines) > 1 and lines[1] in _ENDINGS:
                return


# --- sessions -------------------------------------------------------------------------


@router.post("/sessions", status_code=status.HTTP_201_CREATED)
async def create_session(
    data: SessionCreate, principal: Writer, rt: Runtime, meta: Meta
) -> SessionRead:
    """Start a conversation with an agent."""
    return await service.create_session(rt, principal, data, meta)


@router.get("/sessions")
async def list_sessions(
    principal: Reader,
    rt: Runtime,
    agent_id: uuid.UUID | None = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> list[SessionRead]:
    """Sessions, most recently active first (a user sees their own; admins and keys all)."""
    return await service.list_sessions(rt, principal, agent_id, limit)


@router.get("/sessions/{session_id}")
async def get_session(
    session_id: uuid.UUID,
    principal: Reader,
    rt: Runtime,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    before: Annotated[str | None, Query(max_length=200)] = None,
) -> SessionDetail:
    """A session with its newest messages; `before=<next_cursor>` pages back."""
    return await service.get_session(rt, principal, session_id, limit=limit, before=before)


@router.patch("/sessions/{session_id}")
async def update_session(
    session_id: uuid.UUID, data: SessionUpdate, principal: Writer, rt: Runtime, meta: Meta
) -> SessionRead:
    """Replace the session's variables (published as `session.variables.updated`)."""
    return await service.update_session(rt, principal, session_id, data.variables, meta)


@router.delete("/sessions/{session_id}", status_code=_NO_CONTENT)
async def delete_session(
    session_id: uuid.UUID, principal: Writer, rt: Runtime, meta: Meta
) -> Response:
    """Delete a session and its messages (its runs stay, detached)."""
    await service.delete_session(rt, principal, session_id, meta)
    return Response(status_code=_NO_CONTENT)

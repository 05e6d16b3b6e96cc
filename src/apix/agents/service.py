"""Agents (draft and versions), conversation sessions, and runs (created here, executed by
`apix.agents.runner`). Every write is audited; every read is scoped to the caller's
organisation (another tenant's object is a 404)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel
from redis.asyncio import Redis
from sqlalchemy import Select, and_, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from apix.agents.events import MessageCreated, RunCancelled, RunQueued, VariablesUpdated
from apix.agents.models import Agent, AgentRun, AgentVersion, ChatMessage, ChatSession
from apix.agents.schemas import (
    TERMINAL,
    AgentConfig,
    AgentCreate,
    AgentRead,
    AgentUpdate,
    MessageRead,
    RunCreate,
    RunPage,
    RunRead,
    SessionCreate,
    SessionDetail,
    SessionRead,
    VersionRead,
)
from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.cursor import decode_cursor, encode_cursor
from apix.core.errors import BadRequest, Conflict, Forbidden, NotFound
from apix.infra.database import Database, UnitOfWork
from apix.providers import repository as providers
from apix.realtime.broker import Broker
from apix.realtime.channels import NAMESPACES, ChannelRef

RUN_QUEUE = "apix:runs"  # stream of runs to execute: {run, org}
RUN_GROUP = "runners"


class AgentNotFound(NotFound):
    code = "agent_not_found"
    message = "no such agent"


class RunNotFound(NotFound):
    code = "run_not_found"
    message = "no such run"


class SessionNotFound(NotFound):
    code = "session_not_found"
    message = "no such session"


class NotPublished(Conflict):
    code = "agent_not_published"
    message = "the agent has no published version: POST /agents/{id}/publish first"


class SessionBusy(Conflict):
    code = "session_busy"
    message = "the session has an active run"


class SlugTaken(Conflict):
    code = "slug_taken"
    message = "another agent of this organization has this slug"


@dataclass(frozen=True)
class AgentsRuntime:
    database: Database
    redis: Redis
    broker: Broker


def cancel_key(run_id: uuid.UUID) -> str:
    return f"apix:run:{run_id}:cancel"


def agent_channel(org_id: uuid.UUID, agent_id: uuid.UUID) -> ChannelRef:
    return ChannelRef(f"agents:{agent_id}", NAMESPACES["agents"], str(agent_id), str(org_id))


def session_channel(org_id: uuid.UUID, session_id: uuid.UUID) -> ChannelRef:
    return ChannelRef(
        f"sessions:{session_id}", NAMESPACES["sessions"], str(session_id), str(org_id)
    )


def run_channels(run: AgentRun) -> list[ChannelRef]:
    """Where a run's events go: its agent's channel, and its session's."""
    channels = [agent_channel(run.org_id, run.agent_id)]
    if run.session_id is not None:
        channels.append(session_channel(run.org_id, run.session_id))
    return channels


async def publish(broker: Broker, channels: list[ChannelRef], event: str, data: BaseModel) -> None:
    payload = data.model_dump(mode="json")
    for channel in channels:
        await broker.publish(channel, event, payload)


def _org(principal_org: uuid.UUID | None) -> uuid.UUID:
    if principal_org is None:
        raise Forbidden("switch to an organization first")
    return principal_org


# --- agents ---------------------------------------------------------------------------


def _audited(row: Agent) -> dict[str, Any]:
    """An agent's fields as an audit diff compares them (the draft's config flattened)."""
    return {
        "name": row.name,
        "slug": row.slug,
        "description": row.description,
        **{f"config.{k}": v for k, v in row.config.items()},
    }


def agent_read(row: Agent) -> AgentRead:
    return AgentRead(
        id=row.id,
        name=row.name,
        slug=row.slug,
        description=row.description,
        draft=AgentConfig.model_validate(row.config),
        draft_changed=row.draft_changed,
        latest_version=row.latest_version,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


async def _agent(uow: UnitOfWork, org_id: uuid.UUID, agent_id: uuid.UUID) -> Agent:
    row = await uow.session.scalar(
        select(Agent).where(Agent.org_id == org_id, Agent.id == agent_id)
    )
    if row is None:
        raise AgentNotFound
    return row


async def agent_by_slug(uow: UnitOfWork, org_id: uuid.UUID, slug: str) -> Agent:
    row = await uow.session.scalar(select(Agent).where(Agent.org_id == org_id, Agent.slug == slug))
    if row is None:
        raise AgentNotFound(f"no agent with slug {slug!r}")
    return row


async def _check_config(uow: UnitOfWork, org_id: uuid.UUID, config: AgentConfig) -> None:
    if config.provider_id is not None:
        found = await providers.by_ids(uow, org_id, [config.provider_id])
        if config.provider_id not in found:
            raise BadRequest(
                "provider_id names no provider of this organization",
                details=[{"loc": ["body", "provider_id"], "type": "not_found"}],
            )
    # Tools arrive in a later module: the binding is stored as given until then.


async def create_agent(
    rt: AgentsRuntime, principal: Any, data: AgentCreate, meta: RequestMeta
) -> AgentRead:
    org_id = _org(principal.org_id)
    config = AgentConfig.model_validate(data.model_dump(exclude={"name", "slug", "description"}))
    try:
        async with rt.database.transaction(org_id) as uow:
            await _check_config(uow, org_id, config)
            row = Agent(
                id=uuid.uuid4(),
                org_id=org_id,
                slug=data.slug,
                name=data.name,
                description=data.description,
                config=config.model_dump(mode="json"),
                draft_changed=True,
                created_by=principal.actor_id,
            )
            uow.session.add(row)
            await uow.session.flush()
            await uow.session.refresh(row)
            await audit.record(
                uow,
                "agent.created",
                meta=meta,
                org_id=org_id,
                target_type="agent",
                target_id=row.id,
                details={"slug": row.slug, "name": row.name},
                by=principal,
            )
    except IntegrityError as exc:
        raise SlugTaken from exc
    return agent_read(row)


async def list_agents(rt: AgentsRuntime, principal: Any) -> list[AgentRead]:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        rows = await uow.session.scalars(
            select(Agent).where(Agent.org_id == org_id).order_by(Agent.created_at, Agent.id)
        )
        return [agent_read(r) for r in rows]


async def get_agent(rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID) -> AgentRead:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        return agent_read(await _agent(uow, org_id, agent_id))


async def update_agent(
    rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID, data: AgentUpdate, meta: RequestMeta
) -> AgentRead:
    org_id = _org(principal.org_id)
    changes = data.model_dump(exclude_unset=True, mode="json")
    try:
        async with rt.database.transaction(org_id) as uow:
            row = await _agent(uow, org_id, agent_id)
            before = _audited(row)
            for field in ("name", "slug", "description"):
                if field in changes:
                    if changes[field] is None and field != "description":
                        raise BadRequest(f"{field} cannot be null")
                    setattr(row, field, changes.pop(field))
            draft = {**row.config, **changes}
            if "provider_id" in changes and changes["provider_id"] is not None:
                draft["routing_policy"] = None
            if "routing_policy" in changes and changes["routing_policy"] is not None:
                draft["provider_id"] = None
            config = AgentConfig.model_validate(draft)
            await _check_config(uow, org_id, config)
            if changes:
                row.config = config.model_dump(mode="json")
                row.draft_changed = True
            row.updated_at = datetime.now(UTC)
            await uow.session.flush()
            await audit.record(
                uow,
                "agent.updated",
                meta=meta,
                org_id=org_id,
                target_type="agent",
                target_id=row.id,
                details={"changes": audit.changes(before, _audited(row))},
                by=principal,
            )
    except IntegrityError as exc:
        raise SlugTaken from exc
    return agent_read(row)


async def delete_agent(
    rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID, meta: RequestMeta
) -> None:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await _agent(uow, org_id, agent_id)
        await uow.session.delete(row)
        await audit.record(
            uow,
            "agent.deleted",
            meta=meta,
            org_id=org_id,
            target_type="agent",
            target_id=agent_id,
            details={"slug": row.slug},
            by=principal,
        )


async def publish_agent(
    rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID, meta: RequestMeta
) -> VersionRead:
    """Freeze the draft as the next version."""
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await uow.session.scalar(
            select(Agent).where(Agent.org_id == org_id, Agent.id == agent_id).with_for_update()
        )
        if row is None:
            raise AgentNotFound
        config = AgentConfig.model_validate(row.config)
        await _check_config(uow, org_id, config)
        version = AgentVersion(
            org_id=org_id,
            agent_id=row.id,
            version=(row.latest_version or 0) + 1,
            config=row.config,
            created_by=principal.actor_id,
        )
        uow.session.add(version)
        row.latest_version = version.version
        row.draft_changed = False
        await uow.session.flush()
        await uow.session.refresh(version)
        await audit.record(
            uow,
            "agent.published",
            meta=meta,
            org_id=org_id,
            target_type="agent",
            target_id=row.id,
            details={"version": version.version},
            by=principal,
        )
    return _version_read(version)


def _version_read(row: AgentVersion) -> VersionRead:
    return VersionRead(
        agent_id=row.agent_id,
        version=row.version,
        config=AgentConfig.model_validate(row.config),
        created_at=row.created_at,
    )


async def list_versions(
    rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID
) -> list[VersionRead]:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        await _agent(uow, org_id, agent_id)
        rows = await uow.session.scalars(
            select(AgentVersion)
            .where(AgentVersion.org_id == org_id, AgentVersion.agent_id == agent_id)
            .order_by(AgentVersion.version)
        )
        return [_version_read(r) for r in rows]


# --- sessions -------------------------------------------------------------------------


def session_read(row: ChatSession) -> SessionRead:
    return SessionRead.model_validate(row, from_attributes=True)


def message_read(row: ChatMessage) -> MessageRead:
    return MessageRead.model_validate(row, from_attributes=True)


def _owned(principal: Any) -> Any:
    """Sessions a caller may see: a user sees their own; API keys and admins see all."""
    if principal.user_id is not None and not principal.can("sessions:admin"):
        return ChatSession.user_id == principal.user_id
    return True


async def _session(
    uow: UnitOfWork, principal: Any, org_id: uuid.UUID, session_id: uuid.UUID, *, lock: bool = False
) -> ChatSession:
    query = select(ChatSession).where(
        ChatSession.org_id == org_id, ChatSession.id == session_id, _owned(principal)
    )
    row = await uow.session.scalar(query.with_for_update() if lock else query)
    if row is None:
        raise SessionNotFound
    return row


async def create_session(
    rt: AgentsRuntime, principal: Any, data: SessionCreate, meta: RequestMeta
) -> SessionRead:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        await _agent(uow, org_id, data.agent_id)
        row = ChatSession(
            org_id=org_id,
            agent_id=data.agent_id,
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            end_user_id=data.end_user_id,
            variables=data.variables,
        )
        uow.session.add(row)
        await uow.session.flush()
        await uow.session.refresh(row)
        await audit.record(
            uow,
            "session.created",
            meta=meta,
            org_id=org_id,
            target_type="chat_session",
            target_id=row.id,
            details={"agent_id": str(data.agent_id)},
            by=principal,
        )
    return session_read(row)


async def list_sessions(
    rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID | None, limit: int
) -> list[SessionRead]:
    org_id = _org(principal.org_id)
    query = select(ChatSession).where(ChatSession.org_id == org_id, _owned(principal))
    if agent_id is not None:
        query = query.where(ChatSession.agent_id == agent_id)
    async with rt.database.transaction(org_id) as uow:
        rows = await uow.session.scalars(
            query.order_by(ChatSession.updated_at.desc(), ChatSession.id).limit(limit)
        )
        return [session_read(r) for r in rows]


async def get_session(
    rt: AgentsRuntime, principal: Any, session_id: uuid.UUID, *, limit: int, before: str | None
) -> SessionDetail:
    """The session with its newest ``limit`` messages (older pages through ``before``)."""
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await _session(uow, principal, org_id, session_id)
        query = select(ChatMessage).where(
            ChatMessage.org_id == org_id, ChatMessage.session_id == session_id
        )
        if before is not None:
            at, message_id = decode_cursor(before)
            query = query.where(
                or_(
                    ChatMessage.created_at < at,
                    and_(ChatMessage.created_at == at, ChatMessage.id < message_id),
                )
            )
        rows = list(
            await uow.session.scalars(
                query.order_by(ChatMessage.created_at.desc(), ChatMessage.id.desc()).limit(
                    limit + 1
                )
            )
        )
    more = len(rows) > limit
    rows = rows[:limit]
    cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
    return SessionDetail(
        **session_read(row).model_dump(),
        messages=[message_read(m) for m in reversed(rows)],
        next_cursor=cursor,
    )


async def update_session(
    rt: AgentsRuntime,
    principal: Any,
    session_id: uuid.UUID,
    variables: dict[str, Any],
    meta: RequestMeta,
) -> SessionRead:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await _session(uow, principal, org_id, session_id, lock=True)
        changes = audit.changes(row.variables, variables)
        row.variables = variables
        row.updated_at = datetime.now(UTC)
        await uow.session.flush()
        await audit.record(
            uow,
            "session.variables.updated",
            meta=meta,
            org_id=org_id,
            target_type="chat_session",
            target_id=row.id,
            details={"changes": changes},
            by=principal,
        )
        event = VariablesUpdated(session_id=row.id, variables=variables)
        channel = session_channel(org_id, row.id)
        uow.after_commit(lambda: publish(rt.broker, [channel], "session.variables.updated", event))
    return session_read(row)


async def delete_session(
    rt: AgentsRuntime, principal: Any, session_id: uuid.UUID, meta: RequestMeta
) -> None:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await _session(uow, principal, org_id, session_id)
        await uow.session.delete(row)
        await audit.record(
            uow,
            "session.deleted",
            meta=meta,
            org_id=org_id,
            target_type="chat_session",
            target_id=session_id,
            details={},
            by=principal,
        )


# --- runs -----------------------------------------------------------------------------


def run_read(row: AgentRun) -> RunRead:
    channel = run_channels(row)[-1].name
    return RunRead(
        id=row.id,
        agent_id=row.agent_id,
        version=row.version,
        session_id=row.session_id,
        status=row.status,
        input=row.input,
        output=row.output,
        usage=row.usage,
        error=row.error,
        metadata=row.metadata_,
        created_at=row.created_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        cancel_requested_at=row.cancel_requested_at,
        channel=channel,
    )


async def create_run(
    rt: AgentsRuntime,
    principal: Any,
    agent_id: uuid.UUID,
    data: RunCreate,
    meta: RequestMeta,
) -> tuple[RunRead, bool]:
    """Queue a run; returns it and whether it is new (an idempotent retry returns the first)."""
    org_id = _org(principal.org_id)
    if data.idempotency_key is not None:
        existing = await _run_by_key(rt, org_id, agent_id, data.idempotency_key)
        if existing is not None:
            return existing, False
    try:
        async with rt.database.transaction(org_id) as uow:
            agent = await _agent(uow, org_id, agent_id)
            version = data.version or agent.latest_version
            if version is None:
                raise NotPublished
            found = await uow.session.scalar(
                select(
                    exists().where(
                        AgentVersion.agent_id == agent_id, AgentVersion.version == version
                    )
                )
            )
            if not found:
                raise NotFound(f"the agent has no version {version}")
            message: ChatMessage | None = None
            if data.session_id is not None:
                session = await _session(uow, principal, org_id, data.session_id, lock=True)
                if session.agent_id != agent_id:
                    raise BadRequest("the session belongs to another agent")
                if data.busy == "reject" and await _active_run(uow, data.session_id):
                    raise SessionBusy
            run = AgentRun(
                id=uuid.uuid4(),
                org_id=org_id,
                agent_id=agent_id,
                version=version,
                session_id=data.session_id,
                status="queued",
                input=data.input,
                metadata_=data.metadata,
                idempotency_key=data.idempotency_key,
                user_id=principal.user_id,
                api_key_id=principal.api_key_id,
            )
            uow.session.add(run)
            if data.session_id is not None:
                message = ChatMessage(
                    org_id=org_id,
                    session_id=data.session_id,
                    role="user",
                    content=data.input,
                    run_id=run.id,
                    created_at=datetime.now(UTC),
                )
                uow.session.add(message)
                await uow.session.execute(
                    update(ChatSession)
                    .where(ChatSession.id == data.session_id)
                    .values(updated_at=func.now())
                )
            await uow.session.flush()
            await uow.session.refresh(run)
            await audit.record(
                uow,
                "agent.run.created",
                meta=meta,
                org_id=org_id,
                target_type="agent_run",
                target_id=run.id,
                details={"agent_id": str(agent_id), "version": version},
                by=principal,
            )
    except IntegrityError:
        if data.idempotency_key is None:
            raise
        existing = await _run_by_key(rt, org_id, agent_id, data.idempotency_key)
        if existing is None:
            raise
        return existing, False
    channels = run_channels(run)
    if message is not None:
        created = MessageCreated(session_id=message.session_id, message=message_read(message))
        await publish(rt.broker, channels[1:], "session.message.created", created)
    queued = RunQueued(run_id=run.id, agent_id=agent_id, version=version, session_id=run.session_id)
    await publish(rt.broker, channels, "agent.run.queued", queued)
    await rt.redis.xadd(RUN_QUEUE, {"run": str(run.id), "org": str(org_id)})
    return run_read(run), True


async def _active_run(uow: UnitOfWork, session_id: uuid.UUID) -> bool:
    return bool(
        await uow.session.scalar(
            select(
                exists().where(
                    AgentRun.session_id == session_id, AgentRun.status.in_(("queued", "running"))
                )
            )
        )
    )


async def _run_by_key(
    rt: AgentsRuntime, org_id: uuid.UUID, agent_id: uuid.UUID, key: str
) -> RunRead | None:
    async with rt.database.transaction(org_id) as uow:
        row = await uow.session.scalar(
            select(AgentRun).where(
                AgentRun.org_id == org_id,
                AgentRun.agent_id == agent_id,
                AgentRun.idempotency_key == key,
            )
        )
        return None if row is None else run_read(row)


def _runs_query(org_id: uuid.UUID) -> Select[Any]:
    return select(AgentRun).where(AgentRun.org_id == org_id)


async def get_run(rt: AgentsRuntime, principal: Any, run_id: uuid.UUID) -> RunRead:
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await uow.session.scalar(_runs_query(org_id).where(AgentRun.id == run_id))
        if row is None:
            raise RunNotFound
        return run_read(row)


async def list_runs(
    rt: AgentsRuntime, principal: Any, agent_id: uuid.UUID, *, limit: int, cursor: str | None
) -> RunPage:
    org_id = _org(principal.org_id)
    query = _runs_query(org_id).where(AgentRun.agent_id == agent_id)
    if cursor is not None:
        at, run_id = decode_cursor(cursor)
        query = query.where(
            or_(AgentRun.created_at < at, and_(AgentRun.created_at == at, AgentRun.id < run_id))
        )
    async with rt.database.transaction(org_id) as uow:
        await _agent(uow, org_id, agent_id)
        rows = list(
            await uow.session.scalars(
                query.order_by(AgentRun.created_at.desc(), AgentRun.id.desc()).limit(limit + 1)
            )
        )
    more = len(rows) > limit
    rows = rows[:limit]
    return RunPage(
        items=[run_read(r) for r in rows],
        next_cursor=encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None,
    )


async def cancel_run(
    rt: AgentsRuntime, principal: Any, run_id: uuid.UUID, meta: RequestMeta
) -> RunRead:
    """A queued run is cancelled at once; a running one stops within a second."""
    org_id = _org(principal.org_id)
    async with rt.database.transaction(org_id) as uow:
        row = await uow.session.scalar(
            _runs_query(org_id).where(AgentRun.id == run_id).with_for_update()
        )
        if row is None:
            raise RunNotFound
        if row.status in TERMINAL:
            return run_read(row)
        now = datetime.now(UTC)
        row.cancel_requested_at = row.cancel_requested_at or now
        cancelled_now = row.status == "queued"
        if cancelled_now:
            row.status = "cancelled"
            row.finished_at = now
        await uow.session.flush()
        await audit.record(
            uow,
            "agent.run.cancelled",
            meta=meta,
            org_id=org_id,
            target_type="agent_run",
            target_id=row.id,
            details={"status": row.status},
            by=principal,
        )
    if cancelled_now:
        await publish(
            rt.broker, run_channels(row), "agent.run.cancelled", RunCancelled(run_id=row.id)
        )
    else:
        await rt.redis.set(cancel_key(row.id), "1", ex=3600)
    return run_read(row)

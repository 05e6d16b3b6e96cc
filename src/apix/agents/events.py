"""The events agents publish (their `data`), one model per type; listed in docs/events.md.

Run events go to `agents:<agent_id>` and, for runs in a session, `sessions:<session_id>`.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import BaseModel

from apix.agents.schemas import MessageRead


class RunQueued(BaseModel):
    run_id: uuid.UUID
    agent_id: uuid.UUID
    version: int
    session_id: uuid.UUID | None


class RunStarted(BaseModel):
    run_id: uuid.UUID
    attempt: int


class MessageDelta(BaseModel):
    """Answer text, in order; ``seq`` counts deltas of the run from 1."""

    run_id: uuid.UUID
    seq: int
    text: str


class MessageReset(BaseModel):
    """A provider failed after answering in part: discard the run's text so far; the next
    provider starts over (a `provider.fallback` with `restarted: true` precedes it)."""

    run_id: uuid.UUID
    seq: int


class MessageCompleted(BaseModel):
    run_id: uuid.UUID
    message_id: uuid.UUID | None  # the stored assistant message, in a session
    text: str


class RunCompleted(BaseModel):
    run_id: uuid.UUID
    usage: dict[str, Any]
    timings: dict[str, float]


class RunFailed(BaseModel):
    run_id: uuid.UUID
    error: dict[str, Any]  # {"code", "message", "details"}


class RunCancelled(BaseModel):
    run_id: uuid.UUID


class MessageCreated(BaseModel):
    """A message was added to a session (on `sessions:<id>`)."""

    session_id: uuid.UUID
    message: MessageRead


class VariablesUpdated(BaseModel):
    session_id: uuid.UUID
    variables: dict[str, Any]


EVENT_TYPES: dict[str, type[BaseModel]] = {
    "agent.run.queued": RunQueued,
    "agent.run.started": RunStarted,
    "message.delta": MessageDelta,
    "message.reset": MessageReset,
    "message.completed": MessageCompleted,
    "agent.run.completed": RunCompleted,
    "agent.run.failed": RunFailed,
    "agent.run.cancelled": RunCancelled,
    "session.message.created": MessageCreated,
    "session.variables.updated": VariablesUpdated,
}

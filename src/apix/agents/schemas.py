"""Request and response bodies of agents, sessions and runs, and the run events."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from apix.identity.schemas import JsonObject, Text

RoutingPolicy = Literal["primary", "lowest_latency", "fallback"]
RunStatus = Literal["queued", "running", "completed", "failed", "cancelled"]
TERMINAL: frozenset[str] = frozenset({"completed", "failed", "cancelled"})
Busy = Literal["enqueue", "reject"]

_SLUG = r"^[a-z0-9][a-z0-9-]{0,63}$"
_Metadata = JsonObject


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AgentConfig(_Strict):
    """What a version freezes: how the agent calls a model."""

    provider_id: uuid.UUID | None = Field(
        None, description="The provider to call; unset: `routing_policy` chooses."
    )
    routing_policy: RoutingPolicy | None = Field(
        None, description="`primary`, `lowest_latency` or `fallback` when no provider is named."
    )
    model: Text | None = Field(
        None, max_length=200, description="Model name; unset: the provider's default model."
    )
    temperature: float = Field(0.7, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    system_prompt: Text = Field("", max_length=100_000)
    memory_enabled: bool = False
    tool_ids: list[uuid.UUID] = Field(default_factory=list, max_length=128)
    metadata: _Metadata = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_route(self) -> AgentConfig:
        if self.provider_id is not None and self.routing_policy is not None:
            raise ValueError("name a provider_id or a routing_policy, not both")
        return self


class AgentCreate(AgentConfig):
    name: Text = Field(min_length=1, max_length=200)
    slug: str = Field(pattern=_SLUG, description="Unique in the organisation; used as `model`.")
    description: Text | None = Field(None, max_length=10_000)


class AgentUpdate(_Strict):
    """Changes to the draft; publishing freezes the draft as the next version."""

    name: Text | None = Field(None, min_length=1, max_length=200)
    slug: str | None = Field(None, pattern=_SLUG)
    description: Text | None = Field(None, max_length=10_000)
    provider_id: uuid.UUID | None = None
    routing_policy: RoutingPolicy | None = None
    model: Text | None = Field(None, max_length=200)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, ge=1, le=1_000_000)
    system_prompt: Text | None = Field(None, max_length=100_000)
    memory_enabled: bool | None = None
    tool_ids: list[uuid.UUID] | None = Field(None, max_length=128)
    metadata: _Metadata | None = None


class AgentRead(BaseModel):
    id: uuid.UUID
    name: str
    slug: str
    description: str | None
    draft: AgentConfig
    draft_changed: bool = Field(description="The draft differs from the latest version.")
    latest_version: int | None
    created_at: datetime
    updated_at: datetime


class VersionRead(BaseModel):
    agent_id: uuid.UUID
    version: int
    config: AgentConfig
    created_at: datetime


class RunCreate(_Strict):
    input: Text = Field(min_length=1, max_length=200_000)
    session_id: uuid.UUID | None = None
    version: int | None = Field(None, ge=1, description="Unset: the latest published version.")
    stream: bool = Field(False, description="Answer as SSE that follows the run.")
    metadata: _Metadata = Field(default_factory=dict)
    idempotency_key: Text | None = Field(None, min_length=1, max_length=200)
    busy: Busy = Field(
        "enqueue", description="When the session has an active run: wait for it, or 409."
    )


class RunRead(BaseModel):
    id: uuid.UUID
    agent_id: uuid.UUID
    version: int
    session_id: uuid.UUID | None
    status: RunStatus
    input: str
    output: str | None
    usage: dict[str, Any] | None
    error: dict[str, Any] | None
    metadata: _Metadata
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested_at: datetime | None
    channel: str = Field(description="The channel its events are published on.")


class RunPage(BaseModel):
    items: list[RunRead]
    next_cursor: str | None


class SessionCreate(_Strict):
    agent_id: uuid.UUID
    end_user_id: Text | None = Field(
        None, min_length=1, max_length=200, description="Your own id of the end user."
    )
    variables: JsonObject = Field(default_factory=dict)


class SessionUpdate(_Strict):
    variables: JsonObject


class MessageRead(BaseModel):
    id: uuid.UUID
    role: Literal["user", "assistant"]
    content: str
    tokens: int | None
    run_id: uuid.UUID | None
    created_at: datetime


class SessionRead(BaseModel):
    id: uuid.UUID
    agent_id: uuid.UUID
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    end_user_id: str | None
    variables: dict[str, Any]
    summary: str | None
    created_at: datetime
    updated_at: datetime


class SessionDetail(SessionRead):
    messages: list[MessageRead]
    next_cursor: str | None = Field(description="Older messages: pass as `before`.")

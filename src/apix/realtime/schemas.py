"""Protocol frames (PROTOCOL.md) as Pydantic models: commands in, results and events out."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

CommandId = int | str | None
EventType = Annotated[
    str, StringConstraints(pattern=r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)*$", max_length=100)
]
TypePattern = Annotated[str, StringConstraints(pattern=r"^[a-z0-9_.*?\[\]-]{1,100}$")]
ClientType = Literal["WEB_APP", "MOBILE_APP", "SDK_WIDGET", "API_CLIENT", "INTERNAL_SERVICE"]


class _Command(BaseModel):
    # Unknown fields are ignored: newer clients may send fields this server does not know.
    model_config = ConfigDict(extra="ignore")
    id: CommandId = None


class ClientInfo(BaseModel):
    type: ClientType = "API_CLIENT"
    name: Annotated[str, StringConstraints(max_length=100)] | None = None
    version: Annotated[str, StringConstraints(max_length=50)] | None = None


class Position(BaseModel):
    offset: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]
    epoch: Annotated[str, StringConstraints(max_length=64)] | None = None


class Filter(BaseModel):
    types: list[TypePattern] | None = Field(None, max_length=32)


class ConnectCommand(_Command):
    op: Literal["connect"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=8192)]
    client: ClientInfo = Field(default_factory=ClientInfo)
    resume: str | None = None


class SubscribeCommand(_Command):
    op: Literal["subscribe"]
    channel: str
    since: Position | None = None
    last: Annotated[int, Field(ge=0, le=1000)] = 0
    ack: bool = False
    presence: bool = False
    filter: Filter | None = None


class UnsubscribeCommand(_Command):
    op: Literal["unsubscribe"]
    channel: str


class PublishCommand(_Command):
    op: Literal["publish"]
    channel: str
    type: EventType
    data: Any = None
    idempotency_key: Annotated[str, StringConstraints(max_length=200)] | None = None


class HistoryCommand(_Command):
    op: Literal["history"]
    channel: str
    since: Position | None = None
    limit: Annotated[int, Field(ge=1, le=1000)] = 100
    reverse: bool = False


class PresenceCommand(_Command):
    op: Literal["presence"]
    channel: str


class RefreshCommand(_Command):
    op: Literal["refresh"]
    token: Annotated[str, StringConstraints(min_length=1, max_length=8192)]


class PingCommand(_Command):
    op: Literal["ping"]


class PongCommand(_Command):
    op: Literal["pong"]
    ts: int


class AckCommand(_Command):
    op: Literal["ack"]
    channel: str
    offset: Annotated[str, StringConstraints(pattern=r"^[0-9]{1,20}-[0-9]{1,20}$")]


Command = Annotated[
    ConnectCommand
    | SubscribeCommand
    | UnsubscribeCommand
    | PublishCommand
    | HistoryCommand
    | PresenceCommand
    | RefreshCommand
    | PingCommand
    | PongCommand
    | AckCommand,
    Field(discriminator="op"),
]
COMMAND_OPS = frozenset(
    {
        "connect",
        "subscribe",
        "unsubscribe",
        "publish",
        "history",
        "presence",
        "refresh",
        "ping",
        "pong",
        "ack",
    }
)


# --- HTTP API ------------------------------------------------------------------------------


class PublishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: EventType
    data: Any = None
    idempotency_key: Annotated[str, StringConstraints(max_length=200)] | None = None


class PublishResult(BaseModel):
    offset: str
    epoch: str
    id: str
    duplicate: bool = False


class PositionOut(BaseModel):
    offset: str
    epoch: str


class EventOut(BaseModel):
    op: Literal["event"] = "event"
    channel: str
    offset: str
    epoch: str
    id: str
    type: str
    ts: int
    data: Any
    meta: dict[str, Any]
    attempt: int = 1


class HistoryResult(BaseModel):
    events: list[EventOut]
    position: PositionOut


class PresenceClient(BaseModel):
    connection_id: str
    user_id: str | None
    client_type: str
    info: dict[str, Any] = {}


class PresenceResult(BaseModel):
    clients: list[PresenceClient]


class ConnectionOut(BaseModel):
    connection_id: str
    user_id: str | None
    api_key_id: str | None
    client_type: str
    client_name: str | None
    client_version: str | None
    node: str
    channels: list[str]
    connected_at: int
    rtt_ms: float | None


class DeadLetterOut(BaseModel):
    id: str
    channel: str
    offset: str
    epoch: str
    event: dict[str, Any]
    connection_id: str | None
    user_id: str | None
    attempts: int
    status: Literal["pending", "redelivered", "discarded"]
    failed_at: datetime
    resolved_at: datetime | None


class DeadLetterPage(BaseModel):
    items: list[DeadLetterOut]
    next: str | None

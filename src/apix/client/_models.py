"""Values the APIX client hands to applications: events, positions and command results.

Parsed from the gateway's JSON frames (PROTOCOL.md sections 3, 5 and 7); unknown fields are
ignored so a newer server does not break an older client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


def offset_key(offset: str) -> tuple[int, int]:
    """Offsets are stream ids: they compare as (milliseconds, sequence), not as text."""
    ms, _, seq = offset.partition("-")
    return int(ms), int(seq or 0)


@dataclass(frozen=True, slots=True)
class Position:
    """A place in one channel's stream: an offset within one life (``epoch``) of it."""

    offset: str
    epoch: str | None = None

    def to_wire(self) -> dict[str, Any]:
        return {"offset": self.offset, "epoch": self.epoch}

    @classmethod
    def from_wire(cls, value: Any) -> Position:
        return cls(offset=str(value["offset"]), epoch=value.get("epoch"))

    def precedes(self, other: Position) -> bool:
        """Whether ``other`` comes after this position in the same life of the stream."""
        if self.epoch is not None and other.epoch is not None and self.epoch != other.epoch:
            return True  # a new life of the stream: everything in it is new
        return offset_key(self.offset) < offset_key(other.offset)


@dataclass(frozen=True, slots=True)
class Event:
    """One event of a channel. ``offset`` is None for presence events, which are not kept."""

    channel: str
    offset: str | None
    epoch: str | None
    id: str
    type: str
    ts: int
    data: Any
    meta: dict[str, Any] = field(default_factory=dict)
    attempt: int = 1

    @property
    def position(self) -> Position | None:
        return None if self.offset is None else Position(self.offset, self.epoch)

    @classmethod
    def from_wire(cls, frame: dict[str, Any]) -> Event:
        offset = frame.get("offset")
        return cls(
            channel=str(frame["channel"]),
            offset=None if offset is None else str(offset),
            epoch=frame.get("epoch"),
            id=str(frame.get("id", "")),
            type=str(frame.get("type", "")),
            ts=int(frame.get("ts", 0)),
            data=frame.get("data"),
            meta=frame.get("meta") or {},
            attempt=int(frame.get("attempt", 1)),
        )


@dataclass(frozen=True, slots=True)
class PublishResult:
    offset: str
    epoch: str
    id: str
    duplicate: bool = False

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> PublishResult:
        return cls(
            offset=str(result["offset"]),
            epoch=str(result["epoch"]),
            id=str(result["id"]),
            duplicate=bool(result.get("duplicate", False)),
        )


@dataclass(frozen=True, slots=True)
class History:
    """Events kept for replay, oldest first (newest first when asked with ``reverse``), and
    the channel's position when they were read."""

    events: list[Event]
    position: Position

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> History:
        return cls(
            events=[Event.from_wire(e) for e in result.get("events", [])],
            position=Position.from_wire(result["position"]),
        )


@dataclass(frozen=True, slots=True)
class PresenceMember:
    connection_id: str
    user_id: str | None
    client_type: str
    info: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_wire(cls, value: dict[str, Any]) -> PresenceMember:
        return cls(
            connection_id=str(value["connection_id"]),
            user_id=value.get("user_id"),
            client_type=str(value.get("client_type", "")),
            info=value.get("info") or {},
        )


@dataclass(frozen=True, slots=True)
class ConnectionInfo:
    """What the gateway said when the current connection was established."""

    connection_id: str
    session: str | None
    org_id: str | None
    user_id: str | None
    node: str | None
    ping_interval_ms: int
    token_expires_at: int | None  # epoch ms; None for credentials that do not expire

    @classmethod
    def from_wire(cls, result: dict[str, Any]) -> ConnectionInfo:
        expires = result.get("token_expires_at")
        return cls(
            connection_id=str(result["connection_id"]),
            session=result.get("session"),
            org_id=result.get("org_id"),
            user_id=result.get("user_id"),
            node=result.get("node"),
            ping_interval_ms=int(result.get("ping_interval_ms") or 25_000),
            token_expires_at=None if expires is None else int(expires),
        )

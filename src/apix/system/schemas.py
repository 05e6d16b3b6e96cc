"""Contracts of the API root and the status endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ApiLinks(BaseModel):
    docs: str
    redoc: str
    openapi: str
    status: str
    websocket: str


class ApiRoot(BaseModel):
    name: str
    version: str
    links: ApiLinks


class ComponentStatus(BaseModel):
    ok: bool
    embedded: bool
    latency_ms: float | None = None
    version: str | None = None
    error: str | None = None


class MigrationStatus(BaseModel):
    current: str | None
    head: str | None
    up_to_date: bool


class GatewayStatus(BaseModel):
    """This node's real-time gateway: live counts and cumulative counters since start."""

    connections: int
    subscriptions: int
    channels: int
    events_in: int
    frames_out: int
    fanout_ms_total: float
    fanout_batches: int = Field(
        description="Reads from Redis that brought several messages, handled together."
    )
    writes_saved: int = Field(
        description="Socket writes saved: frames that went out joined, less one per write."
    )
    send_buffer_bytes_max: int


class ArchiveStatus(BaseModel):
    """The event archive: what the archivers have yet to write to PostgreSQL."""

    enabled: bool
    events_behind: int
    oldest_pending_age_s: float | None
    archivers: int


class Status(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    node_id: str
    uptime_s: float
    environment: str
    postgres: ComponentStatus
    redis: ComponentStatus
    migrations: MigrationStatus
    gateway: GatewayStatus | None = None
    archive: ArchiveStatus | None = None


class Liveness(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    reasons: list[str]

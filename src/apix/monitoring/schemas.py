"""Contracts of the monitoring API: latency percentiles, alerts, dashboard, health."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

ClientType = Literal["WEB_APP", "MOBILE_APP", "SDK_WIDGET", "API_CLIENT", "INTERNAL_SERVICE"]
AlertState = Literal["firing", "resolved"]


class Percentiles(BaseModel):
    """Latency percentiles in milliseconds (null when nothing was measured)."""

    count: int
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None
    max: float | None
    mean: float | None


class DeliveryLatency(Percentiles):
    namespace: str
    client_type: str


class RttLatency(Percentiles):
    client_type: str


class HttpLatency(Percentiles):
    method: str
    route: str


class LatencyStats(BaseModel):
    window: str
    org_id: uuid.UUID | None = Field(description="null: the whole platform")
    generated_at: int
    delivery: Percentiles = Field(description="publish to socket write, every series merged")
    delivery_by: list[DeliveryLatency]
    rtt: Percentiles = Field(description="heartbeat ping to pong")
    rtt_by: list[RttLatency]
    http: list[HttpLatency] | None = Field(None, description="per route (platform only)")
    redis: Percentiles | None = Field(None, description="round-trip probe (platform only)")
    postgres: Percentiles | None = Field(None, description="round-trip probe (platform only)")


class AlertOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    org_id: uuid.UUID | None
    rule: str
    state: AlertState
    value: float
    threshold: float
    details: dict[str, Any]
    fired_at: datetime
    resolved_at: datetime | None
    resolved_value: float | None


class AlertList(BaseModel):
    items: list[AlertOut]


class ThresholdOut(BaseModel):
    rule: str
    description: str
    threshold: float
    for_s: float
    enabled: bool
    default_threshold: float
    default_for_s: float
    overridden: bool


class ThresholdUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    threshold: float | None = Field(None, ge=0, description="null: the platform default")
    for_s: float | None = Field(None, ge=0, le=86_400, description="null: the default")
    enabled: bool = True


class Point(BaseModel):
    t: int = Field(description="start of the minute, epoch ms")
    value: float


class LatencyPoint(Percentiles):
    t: int


class EventsPoint(BaseModel):
    t: int
    published_per_s: float
    delivered_per_s: float


class ConnectionsPanel(BaseModel):
    now: int
    by_client_type: dict[str, int]
    series: list[Point]


class EventsPanel(BaseModel):
    published_per_s: float = Field(description="events in, over the last minute")
    delivered_per_s: float = Field(description="events out, over the last minute")
    series: list[EventsPoint]


class LatencyPanel(BaseModel):
    last_minute: Percentiles
    series: list[LatencyPoint]


class CountPanel(BaseModel):
    last_minute: int
    last_hour: int
    series: list[Point]


class DeadLetterPanel(CountPanel):
    pending: int | None = Field(description="dead letters not resolved yet (organisation scope)")


class ChannelActivity(BaseModel):
    channel: str
    published: int
    delivered: int


class Dashboard(BaseModel):
    org_id: uuid.UUID | None
    generated_at: int
    resolution_s: int
    connections: ConnectionsPanel
    events: EventsPanel
    delivery_latency: LatencyPanel
    redeliveries: CountPanel
    dead_letters: DeadLetterPanel
    top_channels: list[ChannelActivity]
    alerts_firing: int


class ComponentHealth(BaseModel):
    ok: bool
    latency_ms: float | None = None
    error: str | None = None


class NodeHealth(BaseModel):
    node: str
    process: str = Field(description="`<node>:<pid>`: each process of a node reports apart")
    alive: bool
    last_seen: int
    age_s: float
    connections: int
    subscriptions: int | None
    leader: bool
    version: str | None


class ArchiveHealth(BaseModel):
    enabled: bool
    events_behind: int | None
    oldest_pending_age_s: float | None
    archivers: int | None
    lagging: bool


class Health(BaseModel):
    status: Literal["ok", "degraded", "down"]
    generated_at: int
    postgres: ComponentHealth
    redis: ComponentHealth
    nodes: list[NodeHealth]
    archive: ArchiveHealth
    alerts_firing: int

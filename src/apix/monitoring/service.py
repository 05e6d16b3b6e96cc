"""What the monitoring API answers: merged windows from Redis, alerts and thresholds from
PostgreSQL, and the health of every component. `scope` is an organisation, or None for the
platform (SUPER_ADMIN)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]
from sqlalchemy import func, select
from sqlalchemy.dialects.postgresql import insert

from apix.audit import service as audit
from apix.audit.service import RequestMeta
from apix.core.errors import BadRequest, NotFound
from apix.core.json import loads
from apix.identity.principal import Principal
from apix.monitoring import alerts, histograms, store
from apix.monitoring.alerts import PLATFORM_ORG, RULES
from apix.monitoring.histograms import Window
from apix.monitoring.models import ApixAlert, ApixAlertThreshold
from apix.monitoring.probe import PLATFORM
from apix.monitoring.runtime import MonitoringRuntime
from apix.monitoring.schemas import (
    AlertList,
    AlertOut,
    AlertState,
    ArchiveHealth,
    ChannelActivity,
    ComponentHealth,
    ConnectionsPanel,
    CountPanel,
    Dashboard,
    DeadLetterPanel,
    DeliveryLatency,
    EventsPanel,
    EventsPoint,
    Health,
    HttpLatency,
    LatencyPanel,
    LatencyPoint,
    LatencyStats,
    NodeHealth,
    Percentiles,
    Point,
    RttLatency,
    ThresholdOut,
    ThresholdUpdate,
)
from apix.realtime.models import ApixDeadLetter

_TOP_CHANNELS = 10
_CHECK_TIMEOUT_S = 3.0
_NODES_LISTED_S = 600  # nodes seen within this are listed (dead ones as not alive)


def _key(org_id: uuid.UUID | None) -> str:
    return PLATFORM if org_id is None else str(org_id)


def _percentiles(histogram: HdrHistogram) -> Percentiles:
    return Percentiles(**histograms.summary(histogram).as_dict())


# --- latency stats ---------------------------------------------------------------------


async def stats(
    runtime: MonitoringRuntime,
    org_id: uuid.UUID | None,
    *,
    window: Window,
    namespace: str | None,
    client_type: str | None,
) -> LatencyStats:
    """Percentiles over ``window``, merged across nodes, for one organisation or the
    platform."""
    await runtime.fresh()
    now = time.time()
    org = _key(org_id)
    slots = store.window_slots(now, window.resolution_s, window.slots)
    found = (await store.read_hists(runtime.redis, [org], window.resolution_s, slots))[org]
    series: dict[tuple[str, str, str], HdrHistogram] = {}
    for entries in found:
        for field, payload in entries:
            if field.metric == "delivery" and (
                (namespace is not None and field.d1 != namespace)
                or (client_type is not None and field.d2 != client_type)
            ):
                continue
            if field.metric == "rtt" and client_type is not None and field.d2 != client_type:
                continue
            key = (field.metric, field.d1, field.d2)
            total = series.get(key)
            if total is None:
                total = series[key] = histograms.new()
            total.add(histograms.decode(payload))

    def of(metric: str) -> list[tuple[str, str, HdrHistogram]]:
        return sorted((d1, d2, h) for (m, d1, d2), h in series.items() if m == metric)

    delivery = of("delivery")
    rtt = of("rtt")
    platform = org_id is None
    return LatencyStats(
        window=window.value,
        org_id=org_id,
        generated_at=int(now * 1000),
        delivery=_percentiles(histograms.merged(h for _, _, h in delivery)),
        delivery_by=[
            DeliveryLatency(namespace=d1, client_type=d2, **histograms.summary(h).as_dict())
            for d1, d2, h in delivery
        ],
        rtt=_percentiles(histograms.merged(h for _, _, h in rtt)),
        rtt_by=[RttLatency(client_type=d2, **histograms.summary(h).as_dict()) for _, d2, h in rtt],
        http=[
            HttpLatency(route=d1, method=d2, **histograms.summary(h).as_dict())
            for d1, d2, h in of("http")
        ]
        if platform
        else None,
        redis=_percentiles(histograms.merged(h for _, _, h in of("redis"))) if platform else None,
        postgres=_percentiles(histograms.merged(h for _, _, h in of("postgres")))
        if platform
        else None,
    )


# --- alerts and thresholds ----------------------------------------------------------------


async def list_alerts(
    runtime: MonitoringRuntime, org_id: uuid.UUID | None, *, state: AlertState | None, limit: int
) -> AlertList:
    """Alert episodes, newest first: an organisation's, or the platform's own."""
    query = select(ApixAlert).where(ApixAlert.org_id.is_not_distinct_from(org_id))
    if state is not None:
        query = query.where(ApixAlert.state == state)
    query = query.order_by(ApixAlert.fired_at.desc(), ApixAlert.id.desc()).limit(limit)
    async with runtime.database.transaction(org_id) as uow:
        rows = (await uow.session.scalars(query)).all()
    return AlertList(items=[AlertOut.model_validate(row) for row in rows])


def _threshold_out(found: alerts.Threshold) -> ThresholdOut:
    return ThresholdOut(
        rule=found.rule,
        description=RULES[found.rule].description,
        threshold=found.threshold,
        for_s=found.for_s,
        enabled=found.enabled,
        default_threshold=found.default_threshold,
        default_for_s=found.default_for_s,
        overridden=found.overridden,
    )


async def get_thresholds(
    runtime: MonitoringRuntime, org_id: uuid.UUID | None
) -> list[ThresholdOut]:
    """Every rule's effective threshold (the organisation's, else the platform default)."""
    found = await alerts.thresholds(runtime.database, runtime.config, org_id)
    return [_threshold_out(t) for t in found.values()]


async def set_threshold(
    runtime: MonitoringRuntime,
    org_id: uuid.UUID | None,
    rule: str,
    data: ThresholdUpdate,
    *,
    principal: Principal,
    meta: RequestMeta,
) -> ThresholdOut:
    """Override one rule for an organisation (null fields fall back to the defaults)."""
    if org_id is None:
        raise BadRequest("thresholds belong to an organization: pass org_id")
    known = RULES.get(rule)
    if known is None or known.platform:
        raise NotFound(f"no alert rule {rule!r} for organizations")
    async with runtime.database.transaction(org_id) as uow:
        stmt = insert(ApixAlertThreshold).values(
            id=uuid.uuid4(),
            org_id=org_id,
            rule=rule,
            threshold=data.threshold,
            for_s=data.for_s,
            enabled=data.enabled,
        )
        await uow.session.execute(
            stmt.on_conflict_do_update(
                index_elements=[ApixAlertThreshold.org_id, ApixAlertThreshold.rule],
                set_={
                    "threshold": stmt.excluded.threshold,
                    "for_s": stmt.excluded.for_s,
                    "enabled": stmt.excluded.enabled,
                    "updated_at": func.now(),
                },
            )
        )
        await audit.record(
            uow,
            "monitoring.threshold.set",
            meta=meta,
            org_id=org_id,
            by=principal,
            target_type="alert_rule",
            target_id=rule,
            details=data.model_dump(mode="json"),
        )
    runtime.evaluator.forget_thresholds(str(org_id))
    found = await alerts.thresholds(runtime.database, runtime.config, org_id)
    return _threshold_out(found[rule])


async def _firing(runtime: MonitoringRuntime, org_id: uuid.UUID | None) -> int:
    raw = await runtime.redis.hgetall(alerts.STATE_KEY)
    prefix = f"{PLATFORM_ORG if org_id is None else org_id}|"
    return sum(
        1
        for k, v in raw.items()
        if (k.decode() if isinstance(k, bytes) else k).startswith(prefix)
        and loads(v)["state"] == "firing"
    )


# --- dashboard ----------------------------------------------------------------------------


async def dashboard(runtime: MonitoringRuntime, org_id: uuid.UUID | None) -> Dashboard:
    """The last hour, minute by minute, for one organisation or the platform."""
    await runtime.fresh()
    now = time.time()
    org = _key(org_id)
    minutes = store.window_slots(now, 60, 60)
    recent = store.window_slots(now, 10, 6)
    redis = runtime.redis
    (hists_h, counts_h, hists_m, counts_m), dead = await asyncio.gather(
        asyncio.gather(
            store.read_hists(redis, [org], 60, minutes),
            store.read_counts(redis, [org], 60, minutes),
            store.read_hists(redis, [org], 10, recent),
            store.read_counts(redis, [org], 10, recent),
        ),
        _dead_letters(runtime, org_id),
    )
    per_minute = counts_h[org]

    def total(slots: list[dict[tuple[str, str, str], int]], name: str) -> int:
        return sum(n for slot in slots for (_, c, _), n in slot.items() if c == name)

    def series(name: str, scale: float = 1.0) -> list[Point]:
        return [
            Point(t=m * 60_000, value=round(total([slot], name) * scale, 3))
            for m, slot in zip(minutes, per_minute, strict=True)
        ]

    latency_series = []
    for m, entries in zip(minutes, hists_h[org], strict=True):
        merged = histograms.merged(
            histograms.decode(p) for f, p in entries if f.metric == "delivery"
        )
        if merged.get_total_count():
            latency_series.append(
                LatencyPoint(t=m * 60_000, **histograms.summary(merged).as_dict())
            )
    last_minute = histograms.merged(
        histograms.decode(p)
        for entries in hists_m[org]
        for f, p in entries
        if f.metric == "delivery"
    )
    connections_now, by_type = _connections_now(counts_m[org])
    channels: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for slot in per_minute:
        for (_, name, dim), n in slot.items():
            if name == "channel_in":
                channels[dim][0] += n
            elif name == "channel_out":
                channels[dim][1] += n
    top = sorted(channels.items(), key=lambda item: (-(item[1][0] + item[1][1]), item[0]))
    recent_counts = counts_m[org]
    published = total(recent_counts, "published")
    delivered = total(recent_counts, "delivered")
    return Dashboard(
        org_id=org_id,
        generated_at=int(now * 1000),
        resolution_s=60,
        connections=ConnectionsPanel(
            now=connections_now,
            by_client_type=by_type,
            series=[
                Point(t=m * 60_000, value=_connections_now([slot])[0])
                for m, slot in zip(minutes, per_minute, strict=True)
            ],
        ),
        events=EventsPanel(
            published_per_s=round(published / 60, 3),
            delivered_per_s=round(delivered / 60, 3),
            series=[
                EventsPoint(
                    t=m * 60_000,
                    published_per_s=round(total([slot], "published") / 60, 3),
                    delivered_per_s=round(total([slot], "delivered") / 60, 3),
                )
                for m, slot in zip(minutes, per_minute, strict=True)
            ],
        ),
        delivery_latency=LatencyPanel(last_minute=_percentiles(last_minute), series=latency_series),
        redeliveries=CountPanel(
            last_minute=total(recent_counts, "redelivered"),
            last_hour=total(per_minute, "redelivered"),
            series=series("redelivered"),
        ),
        dead_letters=DeadLetterPanel(
            last_minute=total(recent_counts, "dead_lettered"),
            last_hour=dead[0] if dead is not None else total(per_minute, "dead_lettered"),
            pending=dead[1] if dead is not None else None,
            series=series("dead_lettered"),
        ),
        top_channels=[
            ChannelActivity(channel=name, published=n[0], delivered=n[1])
            for name, n in top[:_TOP_CHANNELS]
        ],
        alerts_firing=await _firing(runtime, org_id),
    )


def _connections_now(
    slots: list[dict[tuple[str, str, str], int]],
) -> tuple[int, dict[str, int]]:
    """Each node's newest connection gauge among ``slots`` (oldest first), summed."""
    newest: dict[str, dict[str, int]] = {}
    for slot in slots:
        per_node: dict[str, dict[str, int]] = defaultdict(dict)
        for (node, name, dim), n in slot.items():
            if name == f"{store.GAUGE}connections":
                per_node[node][dim] = n
        newest.update(per_node)
    by_type: dict[str, int] = defaultdict(int)
    for values in newest.values():
        for kind, n in values.items():
            by_type[kind] += n
    return sum(by_type.values()), dict(sorted(by_type.items()))


async def _dead_letters(
    runtime: MonitoringRuntime, org_id: uuid.UUID | None
) -> tuple[int, int] | None:
    """(dead letters of the last hour, pending ones) from PostgreSQL, for an organisation."""
    if org_id is None:
        return None
    since = datetime.now(UTC) - timedelta(hours=1)
    async with runtime.database.transaction(org_id) as uow:
        row = (
            await uow.session.execute(
                select(
                    func.count().filter(ApixDeadLetter.failed_at >= since),
                    func.count().filter(ApixDeadLetter.status == "pending"),
                ).where(ApixDeadLetter.org_id == org_id)
            )
        ).one()
    return int(row[0]), int(row[1])


# --- health -------------------------------------------------------------------------------


async def health(runtime: MonitoringRuntime, org_id: uuid.UUID | None) -> Health:
    """PostgreSQL, Redis, every node seen lately, the archive, and an overall status."""
    postgres, redis_health = await asyncio.gather(_postgres(runtime), _redis(runtime))
    nodes: list[NodeHealth] = []
    archive = ArchiveHealth(
        enabled=runtime.gateway.settings.worker.archive,
        events_behind=None,
        oldest_pending_age_s=None,
        archivers=None,
        lagging=False,
    )
    firing = 0
    if redis_health.ok:
        await runtime.fresh()
        nodes = await _nodes(runtime, org_id)
        await runtime.refresh_backlog()
        backlog = runtime.archive_backlog
        if backlog is not None:
            age = backlog["oldest_pending_age_s"]
            archive = ArchiveHealth(
                enabled=archive.enabled,
                events_behind=backlog["events_behind"],
                oldest_pending_age_s=age,
                archivers=backlog["archivers"],
                lagging=age is not None and age > runtime.config.alert_archive_lag_s,
            )
        firing = await _firing(runtime, org_id)
    if not (postgres.ok and redis_health.ok):
        status = "down"
    elif archive.lagging or firing or any(not n.alive for n in nodes):
        status = "degraded"
    else:
        status = "ok"
    return Health(
        status=status,
        generated_at=int(time.time() * 1000),
        postgres=postgres,
        redis=redis_health,
        nodes=nodes,
        archive=archive,
        alerts_firing=firing,
    )


async def _nodes(runtime: MonitoringRuntime, org_id: uuid.UUID | None) -> list[NodeHealth]:
    now = time.time()
    redis = runtime.redis
    raw = await redis.zrangebyscore(store.NODES_KEY, int((now - _NODES_LISTED_S) * 1000), "+inf")
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in raw]
    async with redis.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(store.node_key(name))
        infos: list[dict[bytes, bytes]] = await pipe.execute()
    org_connections: dict[str, int] = {}
    if org_id is not None:
        recent = await store.read_counts(redis, [str(org_id)], 10, store.window_slots(now, 10, 3))
        for slot in recent[str(org_id)]:
            per_node: dict[str, int] = defaultdict(int)
            for (node, name, _), n in slot.items():
                if name == f"{store.GAUGE}connections":
                    per_node[node] += n
            org_connections.update(per_node)
    alive_s = max(3 * runtime.config.push_interval_s, 15.0)
    out = []
    for name, info in zip(names, infos, strict=True):
        fields = {k.decode(): v.decode() for k, v in info.items()}
        last_seen = int(fields.get("last_seen", 0))
        age = max(0.0, now - last_seen / 1000)
        out.append(
            NodeHealth(
                node=fields.get("node", name),
                process=name,
                alive=age <= alive_s,
                last_seen=last_seen,
                age_s=round(age, 3),
                connections=org_connections.get(name, 0)
                if org_id is not None
                else int(fields.get("connections", 0)),
                subscriptions=None if org_id is not None else int(fields.get("subscriptions", 0)),
                leader=fields.get("leader") == "1",
                version=fields.get("version"),
            )
        )
    return sorted(out, key=lambda n: n.process)


async def _postgres(runtime: MonitoringRuntime) -> ComponentHealth:
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            result: dict[str, Any] = await runtime.database.ping()
    except Exception as exc:
        return ComponentHealth(ok=False, error=type(exc).__name__)
    return ComponentHealth(ok=True, latency_ms=result["latency_ms"])


async def _redis(runtime: MonitoringRuntime) -> ComponentHealth:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(_CHECK_TIMEOUT_S):
            await runtime.redis.ping()
    except Exception as exc:
        return ComponentHealth(ok=False, error=type(exc).__name__)
    return ComponentHealth(ok=True, latency_ms=round((time.perf_counter() - started) * 1000, 3))

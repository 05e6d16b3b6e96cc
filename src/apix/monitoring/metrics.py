"""This node's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

Counters and histograms are fed from the probe's batches (never per delivery); gauges are
read when scraped: the gateway's connections, the database pool, the archive backlog.
Every name is listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from apix.monitoring.probe import Counts, Sample
from apix.monitoring.store import group

if TYPE_CHECKING:
    from apix.monitoring.runtime import MonitoringRuntime

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Metrics:
    def __init__(self, runtime: MonitoringRuntime) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.events = {
            "published": Counter(
                "apix_events_published",
                "Events published cluster-wide, per namespace; counted only by the node "
                "holding the monitoring lease (sum over nodes).",
                ["namespace"],
                registry=r,
            ),
            "delivered": Counter(
                "apix_events_delivered",
                "Live event frames this node wrote to WebSockets, per namespace.",
                ["namespace"],
                registry=r,
            ),
            "redelivered": Counter(
                "apix_events_redelivered",
                "Unacknowledged events this node sent again, per namespace.",
                ["namespace"],
                registry=r,
            ),
            "dead_lettered": Counter(
                "apix_events_dead_lettered",
                "Events this node dead-lettered after their last attempt, per namespace.",
                ["namespace"],
                registry=r,
            ),
            "coalesced": Counter(
                "apix_qos_coalesced",
                "Low-priority frames replaced by a newer one with the same coalescing key "
                "while a connection's send buffer was under pressure, per namespace.",
                ["namespace"],
                registry=r,
            ),
        }
        self.delivery = Histogram(
            "apix_delivery_latency_seconds",
            "Publish (event ts) to socket write, sampled, per namespace and client type.",
            ["namespace", "client_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rtt = Histogram(
            "apix_heartbeat_rtt_seconds",
            "Protocol ping to pong round trip, per client type.",
            ["client_type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http = Histogram(
            "apix_http_request_duration_seconds",
            "HTTP request duration per route template and method.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.http_requests = Counter(
            "apix_http_requests",
            "HTTP requests per route template, method and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.round_trip = Histogram(
            "apix_backend_round_trip_seconds",
            "Round trip of the periodic probe to a backend (`redis`, `postgres`).",
            ["backend"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        r.register(_Snapshot(runtime))

    def observe(self, samples: list[Sample], counts: Counts) -> None:
        """Fold one drained batch in (HTTP is observed by the middleware itself)."""
        for (_org, metric, d1, d2), values in group(samples).items():
            if metric == "delivery":
                child = self.delivery.labels(d1, d2)
            elif metric == "rtt":
                child = self.rtt.labels(d2)
            elif metric in ("redis", "postgres"):
                child = self.round_trip.labels(metric)
            else:
                continue
            for micros in values:
                child.observe(micros / 1_000_000)
        for (_org, name, dim), n in counts.items():
            counter = self.events.get(name)
            if counter is not None and n:
                counter.labels(dim).inc(n)


class _Snapshot(Collector):
    """Gauges read at scrape time."""

    def __init__(self, runtime: MonitoringRuntime) -> None:
        self.runtime = runtime

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        runtime = self.runtime
        gateway = runtime.gateway
        connections = GaugeMetricFamily(
            "apix_connections", "Open WebSocket connections on this node.", labels=["client_type"]
        )
        by_type: dict[str, int] = {}
        for (_, kind), n in gateway.census.items():
            by_type[kind] = by_type.get(kind, 0) + n
        for kind, n in sorted(by_type.items()):
            connections.add_metric([kind], n)
        yield connections
        yield GaugeMetricFamily(
            "apix_subscriptions", "Subscriptions on this node.", value=gateway.subscribed.total()
        )
        yield GaugeMetricFamily(
            "apix_channels", "Channels this node listens to.", value=gateway.hub.channel_count()
        )
        stats = gateway.hub.stats
        yield CounterMetricFamily(
            "apix_events_received",
            "Events this node received from Redis to fan out.",
            value=stats.events_in,
        )
        yield CounterMetricFamily(
            "apix_frames_sent",
            "Event frames this node's hub handed to subscribers (WebSocket and SSE).",
            value=stats.frames_out,
        )
        yield CounterMetricFamily(
            "apix_fanout_seconds", "Time this node spent fanning events out.",
            value=stats.fanout_seconds,
        )  # fmt: skip
        yield CounterMetricFamily(
            "apix_fanout_batches",
            "Reads from Redis that brought several messages, handled together.",
            value=stats.batches,
        )
        yield CounterMetricFamily(
            "apix_fanout_writes_saved",
            "Socket writes saved: frames that went out joined, less one per write.",
            value=stats.writes_saved,
        )
        yield CounterMetricFamily(
            "apix_monitoring_samples_dropped",
            "Latency samples dropped because the probe's buffer was full.",
            value=runtime.probe.dropped,
        )
        yield from _pool(runtime)
        backlog: dict[str, Any] | None = runtime.archive_backlog
        if backlog is not None:
            yield GaugeMetricFamily(
                "apix_archive_events_behind",
                "Events queued for the archiver and not written yet (cluster).",
                value=backlog["events_behind"],
            )
            yield GaugeMetricFamily(
                "apix_archive_oldest_pending_age_seconds",
                "Age of the oldest event not archived yet (cluster; 0 when none).",
                value=backlog["oldest_pending_age_s"] or 0.0,
            )
            yield GaugeMetricFamily(
                "apix_archive_archivers", "Live archivers (cluster).", value=backlog["archivers"]
            )


def _pool(runtime: MonitoringRuntime) -> Iterator[Metric]:
    pool: Any = runtime.database.engine.pool
    family = GaugeMetricFamily(
        "apix_db_pool_connections",
        "This node's PostgreSQL pool: connections checked out, idle, and the pool size.",
        labels=["state"],
    )
    try:
        family.add_metric(["checked_out"], pool.checkedout())
        family.add_metric(["idle"], pool.checkedin())
        family.add_metric(["size"], pool.size())
    except AttributeError:  # a pool without these counters (e.g. NullPool)
        return
    yield family

"""This node's Prometheus metrics (`GET /metrics`), in a registry of its own per app.

Counters and histograms are fed from the probe's batches (never per delivery): the latency
histograms from its tallies, a bucket at a time. Gauges are read when scraped: the gateway's
connections, the database pool, the archive backlog.
Every name is listed in docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from apix.monitoring.histograms import PROMETHEUS_BOUNDS_S, Tally
from apix.monitoring.probe import Counts, Tallies

if TYPE_CHECKING:
    from apix.monitoring.runtime import MonitoringRuntime

_LE = [*map(floatToGoString, PROMETHEUS_BOUNDS_S), "+Inf"]


class _Series:
    __slots__ = ("counts", "sum_us")

    def __init__(self) -> None:
        self.counts = [0] * len(_LE)  # per bucket, not cumulative
        self.sum_us = 0


class Latencies:
    """A Prometheus histogram with labels, fed whole tallies: what `Histogram.observe` of
    every value would show, at one addition per bucket instead of a locked call per value."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self._series: dict[tuple[str, ...], _Series] = {}

    def add(self, labels: tuple[str, ...], tally: Tally) -> None:
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = _Series()
        series.counts = [a + b for a, b in zip(series.counts, tally.prometheus, strict=True)]
        series.sum_us += tally.sum_us

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for labels, series in self._series.items():
            buckets = list(zip(_LE, accumulate(series.counts), strict=True))
            family.add_metric(list(labels), buckets, sum_value=series.sum_us / 1_000_000)
        return family


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
        self.delivery = Latencies(
            "apix_delivery_latency_seconds",
            "Publish (event ts) to socket write, sampled, per namespace and client type.",
            ["namespace", "client_type"],
        )
        self.rtt = Latencies(
            "apix_heartbeat_rtt_seconds",
            "Protocol ping to pong round trip, per client type.",
            ["client_type"],
        )
        self.http = Histogram(
            "apix_http_request_duration_seconds",
            "HTTP request duration per route template and method.",
            ["method", "route"],
            buckets=PROMETHEUS_BOUNDS_S,
            registry=r,
        )
        self.http_requests = Counter(
            "apix_http_requests",
            "HTTP requests per route template, method and status code.",
            ["method", "route", "status"],
            registry=r,
        )
        self.round_trip = Latencies(
            "apix_backend_round_trip_seconds",
            "Round trip of the periodic probe to a backend (`redis`, `postgres`).",
            ["backend"],
        )
        r.register(_Snapshot(runtime))

    def observe(self, tallies: Tallies, counts: Counts) -> None:
        """Fold one drained batch in (HTTP is observed by the middleware itself)."""
        for (_org, metric, d1, d2), tally in tallies.items():
            if metric == "delivery":
                self.delivery.add((d1, d2), tally)
            elif metric == "rtt":
                self.rtt.add((d2,), tally)
            elif metric in ("redis", "postgres"):
                self.round_trip.add((metric,), tally)
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
        metrics = runtime.metrics
        yield metrics.delivery.family()
        yield metrics.rtt.family()
        yield metrics.round_trip.family()
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
